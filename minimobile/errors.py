"""Errors a user can cause, and the one-sentence way we report them.

Anything a user can get wrong (a mistyped dataset name, data missing offline, a batch that does not
split across devices, a corrupt checkpoint, a loss that became NaN) raises `UserError` with one sentence
that says what to do. Command-line entry points wrap `main` in `exit_on_user_error`, which prints that
sentence to stderr and exits non-zero, instead of a 40-line traceback that hides the one line that matters.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A problem the user can fix; its message is one sentence saying how."""

    exit_code = 2


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = 3


class ArgumentParser(argparse.ArgumentParser):
    """argparse, whose refusals (an unknown choice, a number that is not one) are one line too.

    argparse's own prints the whole usage first: 24 lines for `train`, with the error last.
    """

    def error(self, message: str):
        print(f"error: {message}; see `{self.prog} --help`.", file=sys.stderr)
        sys.exit(2)


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Wraps a CLI `main`: a `UserError` becomes one line on stderr and a non-zero exit."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            # Training installs its own handler (it saves first); elsewhere Ctrl-C just stops quietly.
            print("interrupted.", file=sys.stderr)
            sys.exit(130)
        except BrokenPipeError:
            # The reader of our output went away (`... | head`): stop quietly, as `cat` would.
            silence_stdout()
            sys.exit(1)

    return wrapped


def silence_stdout() -> None:
    """Send the rest of stdout to /dev/null (its reader is gone), so that no later print fails."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
