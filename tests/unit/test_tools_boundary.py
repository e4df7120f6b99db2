"""The tools (``iotpipe_tools``: benchmarks, simulator, waits) stay outside the product.

No module of the product package imports them, ``iotpipe up`` runs without them, and the
``iotpipe`` command says so plainly when an install (the workload image) leaves them out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from iotpipe import cli

pytestmark = pytest.mark.unit

PRODUCT = Path(__file__).resolve().parents[2] / "workloads" / "iotpipe"
TOOLS = "iotpipe_tools"


TIERS = ("ingest", "middle", "relay", "storage")


def imports_of(source: str, package: str) -> list[int]:
    """Line numbers of every absolute import of ``package`` in ``source`` (any scope)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        if any(name == package or name.startswith(f"{package}.") for name in names):
            lines.append(node.lineno)
    return lines


def tools_imports(source: str) -> list[int]:
    """Line numbers of every import of the tools package in ``source`` (any scope)."""
    return imports_of(source, TOOLS)


def test_the_check_sees_every_form_of_import() -> None:
    source = ("import iotpipe_tools\nfrom iotpipe_tools.bench import main\n"
              "def f():\n    import iotpipe_tools.simulate as s\n"
              "import iotpipe_toolsmith\nfrom iotpipe import fleet\n")
    assert tools_imports(source) == [1, 2, 4]


def test_no_product_module_imports_the_tools() -> None:
    modules = sorted(PRODUCT.rglob("*.py"))
    assert len(modules) > 50, PRODUCT  # the walk found the product, not an empty folder
    found = {str(path.relative_to(PRODUCT)): lines for path in modules
             if (lines := tools_imports(path.read_text()))}
    assert not found, f"product modules importing {TOOLS}: {found}"


def test_no_tier_imports_another_tier() -> None:
    """Tiers meet only through wire contracts and shared modules (wire, wsframes, settings)."""
    found = {}
    for tier in TIERS:
        modules = sorted((PRODUCT / tier).rglob("*.py"))
        assert modules, tier
        for path in modules:
            source = path.read_text()
            for other in TIERS:
                if other != tier and (lines := imports_of(source, f"iotpipe.{other}")):
                    found[f"{path.relative_to(PRODUCT)} -> {other}"] = lines
    assert not found, f"tier modules importing another tier: {found}"


def test_up_and_the_tiers_load_without_the_tools() -> None:
    code = ("import sys\n"
            "import iotpipe.cli, iotpipe.local, iotpipe.fleet, iotpipe.supervisor\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] == {TOOLS!r})\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("command", ["simulate", "bench"])
def test_a_tool_command_without_the_tools_says_so(
        command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [m for m in sys.modules if m == TOOLS or m.startswith(f"{TOOLS}.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, TOOLS, None)  # what an install without them sees
    assert cli.main([command, "--help"]) == 2
    err = capsys.readouterr().err
    assert f"iotpipe {command}: the tools package ({TOOLS}) is not installed" in err


def test_tool_commands_are_reachable_through_the_cli(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "--help"]) == 0
    listed = capsys.readouterr().out
    for name in ("queue", "ingest", "connections", "pipeline", "storage", "middle", "relay"):
        assert f"  {name} " in listed, listed
