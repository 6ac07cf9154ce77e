"""The import layering of netjail: imports point down, the client never loads kernel code."""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "netjail"

#: Modules that make up the client side; none may reach the daemon or the kernel.
CLIENT_SIDE = [
    "netjail.client",
    "netjail.asyncclient",
    "netjail.session",
    "netjail.cli",
    "netjail.clicontext",
    "netjail.runcommand",
    "netjail.commands",
    "netjail.console",
    "netjail.decisionprompt",
    "netjail.eventview",
    "netjail.relay",
    "netjail.statusview",
    "netjail.protocol",
    "netjail.requests",
    "netjail.replies",
    "netjail.errors",
    "netjail.text",
    "netjail.units",
    "netjail.policy",
    "netjail.rulegrammar",
    "netjail.doctor",
    "netjail.doctor.access",
    "netjail.doctor.features",
    "netjail.doctor.host",
    "netjail.doctor.probe",
    "netjail.doctor.result",
    "netjail.doctor.tools",
    "netjail.hostns",
    "netjail.mountinfo",
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


@cache
def _direct_imports(module: str) -> frozenset[str]:
    """Every module named by an import statement anywhere in ``module`` (lazy ones too)."""
    path = _modules()[module]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve_relative(
                    module, path.name == "__init__.py", node.level, node.module
                )
            else:
                base = node.module or ""
            found.add(base)
            # ``from netjail import protocol`` imports the submodule netjail.protocol.
            found.update(
                f"{base}.{alias.name}"
                for alias in node.names
                if f"{base}.{alias.name}" in _modules()
            )
    found.discard("__future__")
    return frozenset(found)


def _internal_edges(module: str) -> set[str]:
    """The netjail modules loaded by importing ``module``: its imports and their packages."""
    edges = set()
    for name in _direct_imports(module):
        parts = name.split(".")
        # Importing a.b.c runs a/__init__ and a/b/__init__ first.
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in _modules():
                edges.add(prefix)
    parent = module.rpartition(".")[0]
    if parent:
        edges.add(parent)
    edges.discard(module)
    return edges


def _closure(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        for dep in _internal_edges(current):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    seen.discard(module)
    return seen


def _is_under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_walker_sees_the_package() -> None:
    """The import walker finds the package's modules and their known imports."""
    modules = _modules()
    assert {"netjail", "netjail.cli", "netjail.daemon.jobs", "netjail.kernel.nflog"} <= set(modules)
    assert {"netjail.kernel.firewall", "netjail.daemon.intake"} <= _internal_edges(
        "netjail.daemon.jailbuild"
    )
    assert "netjail.protocol" in _internal_edges("netjail.runcommand")
    # Lazy imports inside functions count as well.
    assert "netjail.doctor" in _internal_edges("netjail.commands")
    assert "netjail.kernel" in _closure("netjail.daemon.main")


def test_nothing_outside_the_daemon_imports_it() -> None:
    """Only netjail.daemon's own modules import netjail.daemon."""
    offenders = {
        module: sorted(dep for dep in _internal_edges(module) if _is_under(dep, "netjail.daemon"))
        for module in _modules()
        if not _is_under(module, "netjail.daemon")
    }
    assert {module: deps for module, deps in offenders.items() if deps} == {}


@pytest.mark.parametrize("module", CLIENT_SIDE)
def test_client_side_never_reaches_kernel_or_daemon(module: str) -> None:
    """Client-side modules reach neither netjail.kernel nor netjail.daemon, even transitively."""
    assert module in _modules()
    reached = _closure(module)
    assert (
        sorted(
            dep
            for dep in reached
            if _is_under(dep, "netjail.kernel") or _is_under(dep, "netjail.daemon")
        )
        == []
    )


@pytest.mark.parametrize("module", ["netjail.protocol", "netjail.requests", "netjail.replies"])
def test_protocol_imports_only_stdlib_msgspec_and_errors(module: str) -> None:
    """The wire modules' own imports are the standard library, msgspec, netjail.errors, the pure
    netjail.units (the home of the CPU bounds) and each other's messages."""
    imports = _direct_imports(module)
    allowed = {
        name
        for name in imports
        if name
        in {"msgspec", "netjail.errors", "netjail.units", "netjail.requests", "netjail.replies"}
        or (not _is_under(name, "netjail") and name.split(".")[0] in sys.stdlib_module_names)
    }
    assert imports - allowed == set()
    assert "msgspec" in imports


def _loaded_after(statement: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", f"import sys; {statement}; print('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return set(result.stdout.split())


def test_importing_the_cli_loads_no_kernel_code() -> None:
    """`import netjail.cli` loads neither pyroute2 nor any kernel or daemon module."""
    loaded = _loaded_after("import netjail.cli")
    assert "netjail.cli" in loaded
    assert (
        sorted(
            name
            for name in loaded
            if _is_under(name, "pyroute2")
            or _is_under(name, "netjail.kernel")
            or _is_under(name, "netjail.daemon")
        )
        == []
    )


#: What `netjail run` never needs, so `import netjail.cli` must not load it: the doctor (loaded
#: by its command), the asyncio client (by its name), the --ask prompt, and what only they or
#: a parsed option use.
LAZY_FOR_THE_CLI = [
    "netjail.doctor",
    "netjail.decisionprompt",
    "netjail.asyncclient",
    "asyncio",
    "ctypes",
    "gzip",
    "subprocess",
    "fractions",
    "importlib.metadata",
]


def test_importing_the_cli_loads_neither_doctor_nor_what_only_other_commands_need() -> None:
    """`import netjail.cli` (what every command pays for) loads none of LAZY_FOR_THE_CLI, nor
    any doctor submodule; the reply decoder is not built either until a reply comes."""
    loaded = _loaded_after("import netjail.cli")
    assert "netjail.cli" in loaded
    assert sorted(name for name in LAZY_FOR_THE_CLI if name in loaded) == []
    assert sorted(name for name in loaded if _is_under(name, "netjail.doctor")) == []
    built = _loaded_after(
        "import netjail.cli, netjail.protocol as p; "
        "assert p._reply_decoder.cache_info().currsize == 0; "
        "assert p._request_decoder.cache_info().currsize == 0"
    )
    assert "netjail.cli" in built


def test_the_lazy_names_still_load_when_used() -> None:
    """What the CLI does not import up front still works when asked for: the doctor command's
    module, `netjail.AsyncClient`, a size option's parser."""
    loaded = _loaded_after(
        "import netjail, netjail.cli, netjail.units as u; netjail.AsyncClient; "
        "import netjail.doctor; assert u.parse_size('1.5K') == 1536"
    )
    assert {"netjail.doctor", "netjail.asyncclient", "asyncio", "fractions"} <= loaded


def test_module_check_detects_pyroute2() -> None:
    """The sys.modules check above would see pyroute2 if kernel code were imported."""
    assert "pyroute2" in _loaded_after("import netjail.kernel.netns")
