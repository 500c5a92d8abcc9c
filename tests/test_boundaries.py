"""Package boundaries from docs/architecture.md, read from the source: who may import whom, where attention lives."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def _allowed() -> dict[str, set[str] | None]:
    """package → the project packages it may import (``None``: any), from the architecture's package table."""
    allowed = {}
    for line in ARCHITECTURE.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.fullmatch(r"`\w+/`", cells[0]):
            name, may = cells[0].strip("`/"), cells[2]
            allowed[name] = None if may == "any" else set() if may in ("none", "") else {
                p.strip() for p in may.split(",")}
    return allowed


ALLOWED = _allowed()
PACKAGES = tuple(p for p in ALLOWED if (ROOT / p / "__init__.py").exists() or p == "benchmarks")
FORBIDDEN = {p: set(PACKAGES) - {p} - may for p, may in ALLOWED.items() if may is not None and p in PACKAGES}


# an identifier-like string naming a projection ("to_k", "attn2.to_v.weight", "*.to_k"), not prose that mentions one
_PROJECTION_NAME = re.compile(r"[\w.*]*\bto_[kv]\b[\w.*]*")


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(source: str) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in a module's source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def _projection_uses(source: str) -> list[tuple[int, str]]:
    """(line, what) of every attribute, name or identifier-like string that names ``to_k``/``to_v``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in ("to_k", "to_v"):
            found.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.Name) and re.fullmatch(r"\w*to_[kv]\w*", node.id):
            found.append((node.lineno, node.id))
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and _PROJECTION_NAME.fullmatch(node.value.strip())):
            found.append((node.lineno, repr(node.value)))
    return found


def test_the_architecture_names_every_package():
    found = {p.parent.name for p in ROOT.glob("*/__init__.py") if not p.parent.name.startswith(".")}
    assert found <= set(ALLOWED), f"packages missing from docs/architecture.md: {sorted(found - set(ALLOWED))}"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_the_design(package):
    assert _modules(package), f"{package}/ has no modules"
    bad = [f"{path.relative_to(ROOT)}:{line} imports {name}" for path in _modules(package)
           for line, name in _imports(path.read_text(encoding="utf-8")) if name in FORBIDDEN[package]]
    assert not bad, f"{package}/ must not import {sorted(FORBIDDEN[package])}: " + "; ".join(bad)


def test_train_never_touches_to_k_or_to_v():
    """Which projections a layer uses is unet_patch's knowledge; train/ asks unet_patch."""
    bad = [f"{path.relative_to(ROOT)}:{line} {what}" for path in _modules("train")
           for line, what in _projection_uses(path.read_text(encoding="utf-8"))]
    assert not bad, "train/ touches attention projections: " + "; ".join(bad)


def test_the_checks_see_violations():
    source = ("from merge import blend\nimport train.loop\nfrom . import sibling\n"
              "params = [m.to_k for m in layers] + ['attn2.to_v.weight']\nto_v_weight = 1\n"
              "help_text = 'also trains attn2 to_k/to_v'\n")
    assert _imports(source) == [(1, "merge"), (2, "train")]
    assert sorted(_projection_uses(source)) == [(4, "'attn2.to_v.weight'"), (4, ".to_k"), (5, "to_v_weight")]


def test_one_model_loader():
    """Only ``bootstrap/load.py`` reads model weights from disk (``from_pretrained`` / ``from_single_file`` of a
    diffusers or transformers class): trainer, pipeline, CLIs and ComfyUI nodes all load through ``load_model``."""
    loaders = re.compile(r"\b(?!TagDiffusionPipeline)\w+\.(from_pretrained|from_single_file)\(")
    offenders = [f"{path.relative_to(ROOT)}:{n}" for package in PACKAGES if package != "benchmarks"
                 for path in _modules(package) if path != ROOT / "bootstrap" / "load.py"
                 for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if loaders.search(line)]
    assert offenders == []
