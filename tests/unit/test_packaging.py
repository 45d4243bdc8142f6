"""Every package folder is listed in pyproject.toml (the three folders map into one namespace)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROOTS = {"lrexp": ROOT / "src" / "lrexp", "lrexp.kernels": ROOT / "kernels", "lrexp.data_modules": ROOT / "data_modules"}


def test_every_package_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for name, folder in ROOTS.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder)
            parts = [] if str(rel) == "." else list(rel.parts)
            if name == "lrexp" and parts and parts[0] in ("kernels", "data_modules"):
                continue
            found.add(".".join([name, *parts]))
    assert found == listed


def test_namespace_imports():
    import lrexp.data_modules
    import lrexp.kernels

    assert Path(lrexp.kernels.__file__).parent == ROOT / "kernels"
    assert Path(lrexp.data_modules.__file__).parent == ROOT / "data_modules"


def test_triton_is_a_linux_only_dependency():
    """Triton ships Linux wheels only: elsewhere the install must not fail (the triton backend raises instead)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (triton,) = [d for d in deps if d.startswith("triton")]
    assert triton.replace('"', "'").endswith("; platform_system == 'Linux'")
