"""``python tools/warm_bytecode.py`` (``make install``) compiles every copy of the packages it lists."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

# a build helper outside the importable library (tools/), loaded from its file
_spec = importlib.util.spec_from_file_location("warm_bytecode", Path(__file__).parents[1] / "tools" / "warm_bytecode.py")
warm_bytecode = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(warm_bytecode)


def test_a_package_on_the_path_twice_gets_bytecode_in_both_copies(tmp_path, monkeypatch):
    # Ray puts ray/thirdparty_files (its own psutil) before site-packages; Ray's node services import the other copy
    copies = [tmp_path / "vendored", tmp_path / "site-packages"]
    for root in copies:
        (root / "twinpkg" / "sub").mkdir(parents=True)
        (root / "twinpkg" / "__init__.py").write_text("X = 1\n")
        (root / "twinpkg" / "sub" / "__init__.py").write_text("")
        (root / "twinpkg" / "sub" / "mod.py").write_text("Y = 2\n")
    (tmp_path / "site-packages" / "single.py").write_text("Z = 3\n")
    (tmp_path / "site-packages" / "nspkg" / "part").mkdir(parents=True)  # a namespace package (OpenTelemetry's kind)
    (tmp_path / "site-packages" / "nspkg" / "part" / "__init__.py").write_text("")
    monkeypatch.setattr(sys, "path", [str(c) for c in copies] + sys.path)
    monkeypatch.setattr(warm_bytecode, "TREES", ["twinpkg", "single", "nspkg", "not_installed_anywhere"])

    missing = warm_bytecode._compile_trees()

    assert missing == ["not_installed_anywhere"]
    tag = sys.implementation.cache_tag
    for root in copies:
        assert (root / "twinpkg" / "__pycache__" / f"__init__.{tag}.pyc").is_file(), root
        assert (root / "twinpkg" / "sub" / "__pycache__" / f"mod.{tag}.pyc").is_file(), root
    assert (tmp_path / "site-packages" / "__pycache__" / f"single.{tag}.pyc").is_file()
    assert (tmp_path / "site-packages" / "nspkg" / "part" / "__pycache__" / f"__init__.{tag}.pyc").is_file()
