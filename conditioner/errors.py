"""The project's own errors: every one means "the input is wrong" and carries a one-line message saying what to do.

The command lines print a :class:`CondvecError` (and missing or unreadable files, :class:`OSError`) as one line with
exit code 2; anything else is a bug and keeps its traceback. ``CONDVEC_DEBUG=1`` shows the traceback of every error.
"""

from __future__ import annotations


class CondvecError(Exception):
    """Bad input to condvec: a prompt, a table file, a config, a model folder, a command-line argument."""


class UnknownTagError(CondvecError, KeyError):
    """A prompt or an edit names a tag the table does not have (the message lists close matches)."""

    def __str__(self) -> str:  # a KeyError would quote its message
        return str(self.args[0]) if self.args else ""
