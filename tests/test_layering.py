"""The package layout holds: import-linter's contracts (pyproject.toml) and every entry point."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    """The directions in pyproject.toml's [tool.importlinter] contracts (`lint-imports` prints
    the offending import chain when one breaks)."""
    linter = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if linter is None:
        pytest.fail("lint-imports is missing: install the dev extra (bash scripts/install.sh)")
    result = subprocess.run([linter, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_every_entry_point_resolves():
    """The console script and the vLLM plugin point at objects that exist (a move that forgets
    pyproject.toml would only fail on a fresh install, or inside vLLM's engine process)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    targets = dict(project["scripts"])
    for group in project["entry-points"].values():
        targets.update(group)
    assert targets
    for name, target in targets.items():
        entry = importlib.metadata.EntryPoint(name=name, value=target, group="check")
        assert callable(entry.load()), f"{name} = {target} is not callable"
