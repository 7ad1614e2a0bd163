"""Errors a user can cause, and the one-sentence way we report them.

Anything a user can get wrong (a mistyped dataset name, data missing offline, a batch that does not
split across devices, a corrupt checkpoint, a loss that became NaN) raises `UserError` with one sentence
that says what to do. Command-line entry points wrap `main` in `exit_on_user_error`, which prints that
sentence to stderr and exits non-zero, instead of a 40-line traceback that hides the one line that matters.
Ctrl-C and SIGTERM end the same way, in one line, whenever they come (see `exit_on_user_error`).
"""

from __future__ import annotations

import _thread
import argparse
import contextlib
import functools
import os
import signal
import sys
import threading
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


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM, raised wherever the program was, so that `finally` blocks run."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def stopped_by(signum: int) -> str:
    """The line a program stopped by a signal outside training's loop ends with."""
    return "interrupted." if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}."


def _deliver_again_if_dropped(previous):
    """A `sys.unraisablehook` that delivers again a Ctrl-C Python dropped.

    Python cannot raise an exception out of a garbage-collector callback, so one raised there is
    printed ("Exception ignored in: <function _xla_gc_callback>", JAX's) and dropped. A signal handled
    while such a callback runs (JAX's runs at every collection: several times a second while a run
    starts) was lost that way, and the run went on as if no Ctrl-C had come (seen: 3 of 9 Ctrl-Cs in
    a run's first 3 s). Here it is delivered again, a moment later, to be raised in the program's own
    code: delivered at once, it would be raised in this hook, still inside the collection, and dropped
    again. (Should it land in a callback once more, it comes back here: it is never lost.)
    """

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            signum = getattr(unraisable.exc_value, "signum", signal.SIGINT)
            later = threading.Timer(0.05, _thread.interrupt_main, (signum,))
            later.daemon = True  # a program that is ending anyway does not wait for it
            later.start()
        else:
            previous(unraisable)

    return hook


@contextlib.contextmanager
def signals_raise_interrupted():
    """While inside: SIGINT and SIGTERM raise `Interrupted` (SIGTERM would otherwise kill the process
    with no word and no `finally`), and none is lost in a garbage-collector callback.

    Set even where the process was started ignoring them (a pytest-xdist worker's children ignore
    SIGINT), as training's own handler (`train.StopRequest`) is: a signal sent to us is meant for us.
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    previous_hook, sys.unraisablehook = sys.unraisablehook, _deliver_again_if_dropped(sys.unraisablehook)
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for s, handler in previous.items():
            signal.signal(s, handler)


def exit_at_once_on_signals() -> None:
    """For a CLI module run as a program, before its imports: Ctrl-C or SIGTERM prints one line and exits.

    Loading JAX takes a second or more, during which Python would print the import machinery's
    traceback for a Ctrl-C (or, in JAX's garbage-collector callback, drop it); nothing has been
    written yet, so there is nothing to finish. `exit_on_user_error` takes over once `main` runs.
    """

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda signum, frame: exit_at_once(signum))


def exit_at_once(signum: int) -> None:
    """Say in one line that `signum` stopped us, and leave now, without Python's exit-time clean-up (JAX's
    shutdown of jax.distributed among it): for when there is nothing left to finish."""
    with contextlib.suppress(OSError):  # a stdout whose reader has gone
        sys.stdout.flush()
    print(stopped_by(signum), file=sys.stderr, flush=True)
    os._exit(128 + signum)


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Wraps a CLI `main`: a `UserError` becomes one line on stderr and a non-zero exit; so do Ctrl-C and
    SIGTERM (exit code 128 + the signal), after `finally` blocks have tidied up (a workdir's lock file, say)."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            with signals_raise_interrupted():
                return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
        except KeyboardInterrupt as e:
            # Training installs its own handler while it steps (it saves first); before and after, and in
            # the other tools, a signal just stops the program.
            signum = getattr(e, "signum", signal.SIGINT)
            print(stopped_by(signum), file=sys.stderr)
            sys.exit(128 + signum)
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
