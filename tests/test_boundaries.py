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
    """Only ``unet_patch/load.py`` reads model weights from disk (``from_pretrained`` / ``from_single_file`` of a
    diffusers or transformers class): trainer, pipeline, CLIs and ComfyUI nodes all load through ``load_model``."""
    loaders = re.compile(r"\b(?!TagDiffusionPipeline)\w+\.(from_pretrained|from_single_file)\(")
    offenders = [f"{path.relative_to(ROOT)}:{n}" for package in PACKAGES if package != "benchmarks"
                 for path in _modules(package) if path != ROOT / "unet_patch" / "load.py"
                 for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if loaders.search(line)]
    assert offenders == []


def _graph(edges_of) -> dict[str, set[str]]:
    return {p: {q for q in edges_of(p) if q in PACKAGES and q != p} for p in PACKAGES}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the package graph as a path (first == last), or None."""
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_packages_import_one_way_with_no_cycle():
    """Both the design (the "may import" column) and the source's real imports form a graph without cycles."""
    allowed = _graph(lambda p: ALLOWED[p] if ALLOWED[p] is not None else set())
    assert _cycle(allowed) is None, f"docs/architecture.md allows an import cycle: {' → '.join(_cycle(allowed))}"
    real = _graph(lambda p: {name for path in _modules(p) for _, name in _imports(path.read_text(encoding="utf-8"))})
    assert _cycle(real) is None, f"the packages import in a cycle: {' → '.join(_cycle(real))}"


def test_train_imports_no_demo_module():
    assert "demo" not in (ALLOWED["train"] or set())
    bad = [f"{path.relative_to(ROOT)}:{line}" for path in _modules("train")
           for line, name in _imports(path.read_text(encoding="utf-8")) if name == "demo"]
    assert not bad, "train/ imports demo: " + "; ".join(bad)
