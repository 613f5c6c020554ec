"""Files inside installed wheels are found without importing the package."""

import sys

from medfilip.packaged import package_dirs, package_file


def test_finds_a_file_in_an_installed_package_without_importing_it():
    path = package_file("yaml", "__init__.py")
    assert path is not None and path.name == "__init__.py" and path.parent in package_dirs("yaml")


def test_missing_package_or_file_is_none(tmp_path, monkeypatch):
    assert package_dirs("no_such_package_for_medfilip") == []
    assert package_file("no_such_package_for_medfilip", "x") is None
    pkg = tmp_path / "medfilip_fake_pkg"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "data" / "b.txt").write_text("b")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert package_file("medfilip_fake_pkg", "data/a.txt", "data/b.txt") == pkg / "data" / "b.txt"
    assert package_file("medfilip_fake_pkg", "data/a.txt") is None
    assert "medfilip_fake_pkg" not in sys.modules
