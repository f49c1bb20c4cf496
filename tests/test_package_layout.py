"""The core never depends on what only the recipes use (`hf_distill.recipe_support`)."""

import ast
import os
import subprocess
import sys

import hf_distill

PACKAGE_DIR = os.path.dirname(os.path.abspath(hf_distill.__file__))
RECIPE_SUPPORT = "hf_distill.recipe_support"


def core_modules() -> list[str]:
    """Paths of every module of the package outside `recipe_support/`."""
    paths = []
    for folder, subfolders, files in os.walk(PACKAGE_DIR):
        subfolders[:] = [name for name in subfolders if name not in ("recipe_support", "__pycache__")]
        paths += [os.path.join(folder, name) for name in files if name.endswith(".py")]
    return sorted(paths)


def imported_modules(path: str) -> set[str]:
    """Absolute names of the modules `path` imports anywhere (functions included), relative imports resolved."""
    package = "hf_distill." + os.path.relpath(os.path.dirname(path), PACKAGE_DIR).replace(os.sep, ".")
    package = package.removesuffix(".")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_core_modules_never_import_recipe_support():
    offenders = {
        os.path.relpath(path, PACKAGE_DIR): sorted(name for name in imported_modules(path)
                                                   if name.startswith(RECIPE_SUPPORT))
        for path in core_modules()
    }
    offenders = {path: names for path, names in offenders.items() if names}
    assert not offenders, f"core modules import the recipe-only subpackage: {offenders}"
    assert len(core_modules()) > 10  # the walk found the package


def test_importing_the_package_loads_no_recipe_support():
    code = "import sys, hf_distill; print(sorted(m for m in sys.modules if m.startswith('hf_distill.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "hf_distill.trainer" in loaded
    assert RECIPE_SUPPORT not in loaded, loaded


def test_the_scan_sees_a_relative_import_of_recipe_support(tmp_path, monkeypatch):
    fake_package = tmp_path / "hf_distill"
    (fake_package / "heads").mkdir(parents=True)
    module = fake_package / "heads" / "bad.py"
    module.write_text("def f():\n    from ..recipe_support.glue import get_task\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE_DIR", str(fake_package))
    assert "hf_distill.recipe_support.glue" in imported_modules(str(module))
