"""The README's Node.js section shows the executeCode the Node client's tests run."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_shows_the_tested_execute_code_verbatim() -> None:
    """The executeCode snippet in README.md is clients/node/examples/execute-code.js, whole."""
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "clients" / "node" / "examples" / "execute-code.js").read_text()
    assert f"```js\n{example}```\n" in readme
