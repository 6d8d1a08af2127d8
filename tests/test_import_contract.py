"""The sans-IO promise, checked by import-linter with the contract in pyproject.toml: cores
import neither the runtime, zmq, prometheus_client nor time; hw and wire import no role."""
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()"], cwd=root, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_the_import_contract_holds():
    r = lint(REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 kept, 0 broken" in r.stdout


def test_the_contract_catches_a_core_that_reads_the_clock(tmp_path):
    for d in ("nodes", "bench"):
        shutil.copytree(REPO / d, tmp_path / d, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    pins = tmp_path / "nodes" / "mediator" / "pins.py"
    pins.write_text(pins.read_text() + "\nimport time\n")
    hw = tmp_path / "nodes" / "hw" / "regs.py"
    hw.write_text(hw.read_text() + "\nimport nodes.mediator.core\n")
    r = lint(tmp_path)
    assert r.returncode != 0
    assert "nodes.mediator.pins -> time" in r.stdout
    assert "nodes.hw.regs -> nodes.mediator.core" in r.stdout
