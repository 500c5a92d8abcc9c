"""No code path unpickles a user file, and tag names never become file paths outside their folder.

The unpickling check parses every ``.py`` file of the project's packages with ``ast`` (not a regex: aliases such as
``import torch as T`` or ``from pickle import loads`` are resolved) and fails on any call that can run a pickle:
``torch.load`` without ``weights_only=True``, ``pickle.load(s)`` / ``Unpickler``, ``dill``, ``joblib``,
``cloudpickle``, ``shelve``, ``pandas.read_pickle``, ``numpy.load(..., allow_pickle=True)``, ``torch.hub.load``
and accelerate's ``load_state`` / ``save_state`` (which pickle the RNG and custom states).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conditioner.errors import CondvecError

REPO = Path(__file__).resolve().parents[1]
# Modules whose every use can unpickle: importing them at all is refused.
BANNED_MODULES = ("dill", "joblib", "cloudpickle", "shelve", "cPickle", "_pickle")
# Fully qualified calls that unpickle whatever their arguments.
BANNED_CALLS = ("pickle.load", "pickle.loads", "pickle.Unpickler", "pandas.read_pickle", "torch.hub.load",
                "torch.hub.load_state_dict_from_url", "marshal.load", "marshal.loads")
# Method names that pickle or unpickle on any object (accelerate's Accelerator.save_state / load_state).
BANNED_METHODS = ("load_state", "save_state", "read_pickle")


def project_packages() -> list[Path]:
    """Top-level folders of the repository that are Python packages (have an ``__init__.py``), tests excluded."""
    return sorted(p for p in REPO.iterdir()
                  if p.is_dir() and (p / "__init__.py").is_file() and p.name not in ("tests", "build"))


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> qualified name, from the module's imports (``import torch as T`` -> ``{"T": "torch"}``)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(
                    ".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _qualified(func: ast.expr, names: dict[str, str]) -> str | None:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    parts.append(names.get(func.id, func.id))
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unpickling_sites(source: str, filename: str = "<source>") -> list[str]:
    """Every call site in ``source`` that can unpickle, as ``"FILE:LINE: what"`` strings."""
    tree = ast.parse(source, filename=filename)
    names = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for module in modules:
                if module.split(".")[0] in BANNED_MODULES:
                    found.append(f"{filename}:{node.lineno}: imports {module}")
            continue
        if not isinstance(node, ast.Call):
            continue
        name = _qualified(node.func, names)
        if name is None:
            continue
        where = f"{filename}:{node.lineno}"
        if name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            found.append(f"{where}: torch.load without weights_only=True")
        elif name in BANNED_CALLS:
            found.append(f"{where}: {name}")
        elif name in ("numpy.load", "np.load") and _keyword(node, "allow_pickle") is not None and not (
                isinstance(_keyword(node, "allow_pickle"), ast.Constant) and not _keyword(node, "allow_pickle").value):
            found.append(f"{where}: numpy.load with allow_pickle")
        elif isinstance(node.func, ast.Attribute) and node.func.attr in BANNED_METHODS:
            found.append(f"{where}: .{node.func.attr}() pickles")
    return found


# ---------------------------------------------------------------------------------------------------- the detector


BAD_SOURCES = {
    "torch.load bare": "import torch\ntorch.load('x.pt')",
    "torch.load weights_only=False": "import torch\ntorch.load('x.pt', weights_only=False)",
    "torch.load weights_only from a variable": "import torch\nsafe = True\ntorch.load('x.pt', weights_only=safe)",
    "torch aliased": "import torch as T\nT.load('x.pt', map_location='cpu')",
    "from torch import load": "from torch import load\nload('x.pt')",
    "pickle.load": "import pickle\npickle.load(open('x', 'rb'))",
    "pickle.loads aliased": "import pickle as p\np.loads(b'')",
    "from pickle import loads": "from pickle import loads as l\nl(b'')",
    "pickle.Unpickler": "import pickle\npickle.Unpickler(f).load()",
    "dill": "import dill\ndill.load(f)",
    "joblib": "from joblib import load\nload('m.pkl')",
    "numpy allow_pickle": "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
    "numpy allow_pickle variable": "import numpy\nflag = True\nnumpy.load('a.npy', allow_pickle=flag)",
    "pandas.read_pickle": "import pandas as pd\npd.read_pickle('x')",
    "accelerate load_state": "accelerator.load_state('ckpt')",
    "accelerate save_state": "self.acc.save_state(out)",
    "torch.hub.load": "import torch\ntorch.hub.load('repo', 'model')",
}
GOOD_SOURCES = {
    "torch.load weights_only=True": "import torch\ntorch.load('x.pt', weights_only=True, map_location='cpu')",
    "safetensors": "from safetensors.torch import load_file\nload_file('x.safetensors')",
    "pickle error type only": "import pickle\ntry:\n    pass\nexcept pickle.UnpicklingError:\n    pass",
    "numpy without pickles": "import numpy as np\nnp.load('a.npy')\nnp.load('b.npy', allow_pickle=False)",
    "json.load": "import json\njson.load(open('x'))",
    "own load_state_tensors": "opt.load_state_tensors(t, 'rows')\nunet.load_state_dict(sd)",
}


@pytest.mark.parametrize("case", BAD_SOURCES, ids=list(BAD_SOURCES))
def test_detector_finds_each_unpickling_pattern(case):
    assert len(unpickling_sites(BAD_SOURCES[case])) == 1, case


@pytest.mark.parametrize("case", GOOD_SOURCES, ids=list(GOOD_SOURCES))
def test_detector_accepts_safe_loading(case):
    assert unpickling_sites(GOOD_SOURCES[case]) == []


# ---------------------------------------------------------------------------------------------------- the project


def test_every_installed_package_is_scanned():
    names = {p.name for p in project_packages()}
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    include = pyproject.split("[tool.setuptools.packages.find]", 1)[1].split("]", 1)[0]
    installed = {item.strip().strip('"').rstrip("*") for item in include.split("[", 1)[1].split(",")}
    assert installed and installed <= names, installed - names


def test_no_unpickling_call_site_in_the_project():
    files = [path for package in project_packages() for path in sorted(package.rglob("*.py"))]
    assert len(files) > 20
    found = []
    for path in files:
        found += unpickling_sites(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    assert found == [], "unpickling call sites (use safetensors, or torch.load(..., weights_only=True)):\n" + (
        "\n".join(found))


# ---------------------------------------------------------------------------------------------- tag names and paths


@pytest.mark.parametrize("concept", ["../../evil", "/ABS/evil", "a/../../evil"])
def test_demo_concept_tag_cannot_write_outside_the_data_folder(tmp_path, concept):
    """``python -m demo.data --concept TAG=…`` names the concept folders below the output; none may escape it."""
    from demo.data import generate_concepts

    concept = concept.replace("/ABS", str(tmp_path / "abs"))
    data = tmp_path / "deep" / "data"
    before = set(tmp_path.rglob("*"))
    try:
        generate_concepts(data, [f"{concept}=large red circle"], 1)
    except CondvecError as err:  # refusing the tag is fine: one line naming it
        assert "\n" not in str(err) and "evil" in str(err)
    written = {p for p in set(tmp_path.rglob("*")) - before if p.is_file()}
    outside = [p for p in written if data.resolve() not in p.resolve().parents]
    assert outside == [], f"tag {concept!r} wrote outside {data}: {sorted(map(str, outside))[:3]}"
