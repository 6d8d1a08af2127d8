"""The README's test command and .ci/run are the same command, byte for byte: CI runs what a
reader is told to run, and both install the Debian packages the tests need."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().rstrip("\n").splitlines()[-1]
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [line.strip() for line in readme if line.startswith("    ") and "pytest" in line]
    assert commands == [ci], "README test command and .ci/run differ"
    for tool, package in (("promtool", "prometheus"), ("chromium", "chromium")):
        assert f"command -v {tool} " in ci and f" {package}" in ci.split("install", 1)[1]
