"""One CLI error path: `PROG: error: <one line>` on stderr and exit code 2, for every command of the project."""

import pytest
import torch
from safetensors import SafetensorError

from conditioner.cli_errors import OneLineArgumentParser, UsageError, run_cli
from conditioner.errors import CondvecError, UnknownTagError


def _raise(error):
    def body():
        raise error
    return body


@pytest.mark.parametrize("error, line", [
    (CondvecError("bad value\nsecond line"), "bad value"),
    (UnknownTagError("unknown tag 'x'"), "unknown tag 'x'"),
    (FileNotFoundError("table file 'a' does not exist"), "table file 'a' does not exist"),
    (SafetensorError("header too large"), "header too large"),
    (UsageError("--num must be >= 1"), "--num must be >= 1"),
    (CondvecError(""), "CondvecError"),
])
def test_user_errors_are_one_line_and_exit_2(capsys, error, line):
    assert run_cli("prog", _raise(error)) == 2
    captured = capsys.readouterr()
    assert captured.err == f"prog: error: {line}\n" and captured.out == ""


def test_interrupt_is_130_and_bugs_keep_their_traceback(capsys):
    assert run_cli("prog", _raise(KeyboardInterrupt()), interrupted="stopped; resume later") == 130
    assert capsys.readouterr().err == "prog: stopped; resume later\n"
    with pytest.raises(ZeroDivisionError):
        run_cli("prog", lambda: 1 // 0)
    with pytest.raises(ValueError, match="an internal bug"):  # only the project's own errors are one line
        run_cli("prog", _raise(ValueError("an internal bug")))
    with pytest.raises(KeyError):
        run_cli("prog", _raise(KeyError("missing")))
    with pytest.raises(RuntimeError, match="a shape bug"):  # a RuntimeError is a bug, out of memory is not
        run_cli("prog", _raise(RuntimeError("a shape bug")))
    assert run_cli("prog", lambda: None) == 0 and run_cli("prog", lambda: 3) == 3


def test_out_of_memory_is_its_own_one_line_message(capsys):
    assert run_cli("prog", _raise(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB\nmore"))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prog: error: out of memory (CUDA out of memory. Tried to "
                                                   "allocate 2 GiB); use a smaller batch")
    assert run_cli("prog", _raise(MemoryError())) == 2 and "out of memory" in capsys.readouterr().err


def test_condvec_error_is_not_a_value_error():
    """A builtin ValueError raised by a bug is never mistaken for bad input by an ``except CondvecError``."""
    assert not issubclass(CondvecError, ValueError) and issubclass(UsageError, CondvecError)


def test_parser_errors_name_the_subcommand_without_the_usage_block(capsys):
    parser = OneLineArgumentParser(prog="python -m tool")
    sub = parser.add_subparsers(dest="command", required=True).add_parser("blend")
    sub.add_argument("new")
    assert run_cli("tool", lambda: parser.parse_args(["blend"])) == 2
    assert capsys.readouterr().err == "tool: error: blend: the following arguments are required: new\n"
    assert run_cli("tool", lambda: parser.parse_args(["--bogus"])) == 2
    assert capsys.readouterr().err.count("\n") == 1


def _mains():
    from demo.data import main as demo_data
    from demo.detector import main as demo_detector
    from merge.cli import main as merge
    from train.cli import main as train
    from unet_patch.cli import main as generate

    return [("condvec-train", train, []), ("condvec-train", train, ["missing.yaml"]),
            ("condvec-generate", generate, []), ("condvec-generate", generate, ["--model", "m", "--prompt", "a",
                                                                               "--num", "0"]),
            ("condvec-merge", merge, []), ("condvec-merge", merge, ["list", "missing.safetensors"]),
            ("python -m demo.data", demo_data, []), ("python -m demo.detector", demo_detector, ["--num", "0"])]


@pytest.mark.parametrize("index", range(8))
def test_every_command_reports_bad_input_the_same_way(index, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prog, main, argv = _mains()[index]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"{prog}: error: ") and captured.err.count("\n") == 1, captured.err
    assert list(tmp_path.iterdir()) == []


def test_condvec_debug_shows_the_traceback_of_user_errors(monkeypatch):
    monkeypatch.setenv("CONDVEC_DEBUG", "1")
    with pytest.raises(CondvecError, match="bad value"):
        run_cli("prog", _raise(CondvecError("bad value")))
