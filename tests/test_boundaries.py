"""Package boundaries from DESIGN.md, read from the source: who may import whom, and where attention lives."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("conditioner", "unet_patch", "train", "merge", "demo", "bootstrap", "benchmarks")
# package → project packages it must never import
FORBIDDEN = {
    "conditioner": set(PACKAGES) - {"conditioner"},
    "train": {"merge", "benchmarks"},
    "merge": {"train", "unet_patch", "demo", "bootstrap", "benchmarks"},
    "unet_patch": {"train", "merge", "demo", "benchmarks"},
    "demo": {"train", "merge", "unet_patch", "bootstrap", "benchmarks"},
}
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
