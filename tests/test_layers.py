"""The library's layers (pyproject.toml, [tool.importlinter]) hold: checked by import-linter over every import,
function-local ones included, so a cycle cannot hide behind a late import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

from raydecode.methods.spec import methods

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_every_method_is_in_the_independence_contract():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    independent = next(c for c in contracts if c["id"] == "methods")["modules"]
    # the library's own methods (a test's toy method, registered from tests/, is not one)
    assert sorted(m.rsplit(".", 1)[1] for m in independent) == [
        m for m in methods() if (ROOT / "raydecode" / "methods" / f"{m}.py").exists()]
