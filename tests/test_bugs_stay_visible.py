"""A bug is never dressed up as bad input: an exception the code did not mean to raise keeps its traceback.

Every CLI reports bad input as one line with exit code 2 (``tests/test_cli_errors.py``); here a builtin exception is
injected where real bugs live — prompt encoding, the attention processor, a merge, table loading — and each CLI must
let it through (Python prints the traceback and exits 1), while ``CONDVEC_DEBUG=1`` shows the cause of a user error.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_pipeline import _pipe
from testkit import make_unet

from conditioner.errors import CondvecError
from unet_patch import table_for_unet

ROOT = Path(__file__).resolve().parents[1]


class InjectedBug(Exception):
    """Never raised by condvec itself."""


def _boom(error: type[BaseException]):
    def raiser(*args, **kwargs):
        raise error("injected bug")
    return raiser


#: (where, the attribute to replace, the builtin exception it raises)
POINTS = {
    "encode": ("conditioner.encode.parse_prompt", ValueError),
    "processor": ("unet_patch.processor.sources", RuntimeError),
    "table load": ("conditioner.table.check_table", IndexError),
    "merge": ("merge.commands.blend", IndexError),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bugs")
    _pipe(False).save_pretrained(root / "model")
    table = table_for_unet(make_unet(), tags=["cat", "dog"], init_std=1.0, base_name="tiny")
    table.save(root / "table.safetensors")
    return root


def _argv(cli: str, root: Path, out: Path) -> list[str]:
    if cli == "condvec-generate":
        return ["--model", str(root / "model"), "--prompt", "red circle", "--steps", "1", "--out", str(out / "o.png")]
    return ["blend", str(root / "table.safetensors"), "new", "cat + dog", "-o", str(out / "t.safetensors")]


CASES = [("condvec-generate", point) for point in ("encode", "processor", "table load")] + [
    ("condvec-merge", point) for point in ("merge", "table load")]


def _main(cli: str):
    if cli == "condvec-generate":
        from unet_patch.cli import main
    else:
        from merge.cli import main
    return main


@pytest.mark.parametrize("cli, point", CASES, ids=[f"{c}-{p}" for c, p in CASES])
def test_an_injected_builtin_exception_keeps_its_traceback(files, tmp_path, monkeypatch, capsys, cli, point):
    target, error = POINTS[point]
    module, name = target.rsplit(".", 1)
    __import__(module)
    monkeypatch.setattr(sys.modules[module], name, _boom(error))
    with pytest.raises(error, match="injected bug"):
        _main(cli)(_argv(cli, files, tmp_path))
    assert "error:" not in capsys.readouterr().err  # not reported as bad input
    assert not any(p.suffix in (".png", ".safetensors") for p in tmp_path.iterdir())


def test_an_uncaught_bug_exits_1_with_the_traceback(files, tmp_path):
    """The real process: Python's own exit 1 and traceback, not a one-line exit 2."""
    script = ("import sys, unet_patch.processor as p\n"
              "def boom(*a, **k): raise RuntimeError('injected shape bug')\n"
              "p.sources = boom\n"
              "from unet_patch.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script, *_argv("condvec-generate", files, tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback (most recent call last)" in done.stderr and "RuntimeError: injected shape bug" in done.stderr


def test_user_errors_stay_one_line_and_debug_shows_their_cause(files, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file, save_file

    from conditioner.table import METADATA_KEY
    from merge.cli import main

    broken = tmp_path / "broken.safetensors"  # its metadata is not JSON: the decoder's error is the cause
    save_file(load_file(files / "table.safetensors"), broken, metadata={METADATA_KEY: "{not json"})
    argv = ["blend", str(broken), "new", "cat + dog", "-o", str(tmp_path / "t.safetensors")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("condvec-merge: error: ")
    monkeypatch.setenv("CONDVEC_DEBUG", "1")
    with pytest.raises(CondvecError) as raised:
        main(argv)
    assert raised.value.__cause__ is not None, "the original error stays attached for CONDVEC_DEBUG"
    assert not (tmp_path / "t.safetensors").exists()



@pytest.mark.parametrize("error, becomes_one_line", [
    (OSError, True), (ValueError, True), (KeyError, True),  # a missing, broken or foreign file in the user's folder
    (RuntimeError, False), (AttributeError, False), (IndexError, False),  # a bug: the traceback stays
])
def test_model_loader_relabels_only_bad_file_errors(files, monkeypatch, error, becomes_one_line):
    from diffusers import UNet2DConditionModel

    from unet_patch.load import ModelLoadError, load_model

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", _boom(error))
    if becomes_one_line:
        with pytest.raises(ModelLoadError, match="cannot load .*unet") as info:
            load_model(str(files / "model"))
        assert isinstance(info.value.__cause__, error)
    else:
        with pytest.raises(error, match="injected bug"):
            load_model(str(files / "model"))
