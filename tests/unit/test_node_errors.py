"""The Node client's error classes mirror netjail.errors: the same names, tree and codes."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from netjail import errors

NODE_CLIENT = Path(__file__).resolve().parents[2] / "clients" / "node"
DUMP = """
const netjail = require(process.argv[1]);
const tree = {};
for (const [name, value] of Object.entries(netjail)) {
  if (typeof value === 'function' && value.prototype instanceof Error) {
    tree[name] = [value.prototype.code, Object.getPrototypeOf(value).name];
  }
}
console.log(JSON.stringify(tree));
"""


def test_node_error_classes_match_the_python_tree() -> None:
    """Each Python error class has a Node class of the same name, parent and wire code."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (scripts/bootstrap installs it)")
    dumped = subprocess.run(
        [node, "-e", DUMP, str(NODE_CLIENT)], check=True, capture_output=True, text=True
    ).stdout
    classes = [
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.NetjailError)
    ]
    python = {cls.__name__: [cls.code, cls.__mro__[1].__name__] for cls in classes}
    python["NetjailError"][1] = "Error"
    assert json.loads(dumped) == python
