"""tools/check_import_cycles.py on small packages written here: what counts as an import, what it reports."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checker():
    spec = importlib.util.spec_from_file_location("check_import_cycles", ROOT / "tools" / "check_import_cycles.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks its module up while it is defined
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules[spec.name]


def _package(root: Path, files: dict[str, str]) -> str:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(root / "pkg")


def test_a_function_level_import_closes_a_cycle_and_is_reported_with_its_line(checker, tmp_path, capsys):
    pkg = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from pkg.b import thing\n",
        "b.py": "thing = 1\n\n\ndef later():\n    from pkg import a\n    return a\n",
    })
    assert checker.main([pkg, "--no-allow"]) == 1
    out = capsys.readouterr().out
    assert "import cycle [error] among pkg.a, pkg.b:" in out
    assert "a.py:1: pkg.a imports pkg.b" in out and "b.py:5: pkg.b imports pkg.a" in out
    assert "1 import cycle(s) in 3 modules" in out


def test_type_checking_imports_do_not_count_and_relative_imports_resolve(checker, tmp_path):
    pkg = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n",
        "b.py": "from .a import TYPE_CHECKING\n",
        "sub/__init__.py": "from ..c import x\n",
        "c.py": "x = 1\n",
    })
    edges = {(e.source, e.target) for e in checker.import_edges(checker.module_names(pkg))}
    assert edges == {("pkg.b", "pkg.a"), ("pkg.sub", "pkg.c")}
    assert checker.cycle_groups(checker.import_edges(checker.module_names(pkg))) == []


def test_an_allowed_import_tolerates_its_cycle_only_while_it_closes_one(checker, tmp_path, monkeypatch, capsys):
    pkg = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "import pkg.b\n",
        "b.py": "def f():\n    import pkg.a\n",
        "c.py": "import pkg.d\n",
        "d.py": "import pkg.c\n",
    })
    monkeypatch.setattr(checker, "ALLOWED_IMPORTS", [(("pkg.b", "pkg.a"), "goes away soon")])
    assert checker.main([pkg]) == 1  # c <-> d is not allowed
    assert "[allowed: it closes only through pkg.b -> pkg.a (goes away soon)]" in capsys.readouterr().out
    (tmp_path / "pkg" / "d.py").write_text("")
    assert checker.main([pkg]) == 0
    (tmp_path / "pkg" / "b.py").write_text("")
    assert checker.main([pkg]) == 1  # the entry is stale: it must be deleted
    assert "closes no cycle any more: delete it" in capsys.readouterr().out
