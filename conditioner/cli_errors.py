"""One way for every condvec command line to report bad input: one line on stderr, exit code 2, no traceback.

Every CLI of the project (``condvec-train``, ``condvec-generate``, ``condvec-merge``, ``python -m demo.data``, the
benchmarks) builds its parser with :class:`OneLineArgumentParser` and runs its body through :func:`run_cli`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from safetensors import SafetensorError

from conditioner.errors import CondvecError

#: Exceptions that mean "the user's input or files are wrong", reported as one line with exit code 2. Anything else
#: is a bug and keeps its traceback; ``CONDVEC_DEBUG=1`` shows the traceback of these too.
USER_ERRORS: tuple[type[BaseException], ...] = (CondvecError, OSError, SafetensorError)


class UsageError(CondvecError):
    """Bad command-line arguments; :func:`run_cli` reports it as one line with exit code 2."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise :class:`UsageError` instead of printing the usage block and exiting.

    A subcommand's errors name it (``blend: the following arguments are required: NEW``); subcommand parsers made
    with ``add_subparsers().add_parser`` are of this class too.
    """

    subcommand: str | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", _SubcommandsAction)

    def error(self, message: str):
        raise UsageError(f"{self.subcommand}: {message}" if self.subcommand else message)


class _SubcommandsAction(argparse._SubParsersAction):
    def add_parser(self, name: str, **kwargs):
        parser = super().add_parser(name, **kwargs)
        parser.subcommand = name
        return parser


def _out_of_memory() -> tuple[type[BaseException], ...]:
    """torch's out-of-memory error (a ``RuntimeError`` subclass; every other ``RuntimeError`` is a bug)."""
    import torch

    return (torch.OutOfMemoryError,)


def error_line(err: BaseException) -> str:
    """The first line of an exception's message (a ``KeyError``'s key without quotes; the type name when empty)."""
    message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    message = message.strip()
    return message.splitlines()[0] if message else type(err).__name__


def run_cli(prog: str, fn: Callable[[], int | None], interrupted: str = "interrupted") -> int:
    """Run a command-line body, turning user errors into one line on stderr.

    Args:
        prog (`str`): the program name written before ``error:`` (e.g. ``"condvec-merge"``).
        fn (`Callable[[], int | None]`): the body; its return value (``None`` counts as 0) is the exit code.
        interrupted (`str`, defaults to `"interrupted"`): what to print on Ctrl-C (exit code 130).

    Returns:
        `int`: the body's exit code; 2 after a user error — a :class:`~conditioner.errors.CondvecError`, a missing
        or unreadable file (``OSError``), a damaged safetensors file — (``PROG: error: <first line>`` on stderr;
        with ``CONDVEC_DEBUG=1`` the traceback instead); 2 after running out of memory (its own message); 130
        after ``KeyboardInterrupt``. Any other exception is a bug and propagates with its traceback.

    Example:
        ```py
        >>> def body() -> int:
        ...     raise CondvecError("--num must be >= 1, got 0")
        >>> run_cli("demo", body)  # prints "demo: error: --num must be >= 1, got 0" on stderr
        2
        ```
    """
    try:
        code = fn()
    except USER_ERRORS as err:
        if os.environ.get("CONDVEC_DEBUG") == "1":
            raise
        print(f"{prog}: error: {error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    except (MemoryError, *_out_of_memory()) as err:
        if os.environ.get("CONDVEC_DEBUG") == "1":
            raise
        print(f"{prog}: error: out of memory ({error_line(err)}); use a smaller batch, image size or number of "
              "images, or a device with more memory", file=sys.stderr)
        return 2
    return 0 if code is None else int(code)
