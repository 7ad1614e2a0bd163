"""How a command-line tool ends: what a user sees and what a shell script reads from the exit code.

Each case runs a tiny program, in a process of its own, whose `main` (wrapped as every minimobile CLI's
is) raises what a real run can raise. The exit codes are the shell's conventions: 2 for a usage
error, 130 (128 + SIGINT) for Ctrl-C, and 3 for a run whose loss became NaN (a script can retry that
one with a smaller learning rate); 128 + SIGTERM, 143, for a SIGTERM.
"""

import subprocess
import sys

import pytest

PROGRAM = """
import sys
from minimobile.errors import TrainingDiverged, UserError, exit_on_user_error

@exit_on_user_error
def main():
    print("started", flush=True)
    {body}

main()
"""


def run(body: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROGRAM.format(body=body)], capture_output=True, text=True,
                          timeout=60, **kwargs)


@pytest.mark.parametrize("body, code, stderr", [
    ("raise UserError('no checkpoint in runs/x; train first.')", 2, "error: no checkpoint in runs/x; train first.\n"),
    ("raise TrainingDiverged('the loss became nan at step 6; try a smaller --learning-rate.')", 3,
     "error: the loss became nan at step 6; try a smaller --learning-rate.\n"),
    ("raise KeyboardInterrupt", 130, "interrupted.\n"),
    # A scheduler's SIGTERM, outside the training loop (which saves first): by default it would kill the
    # process without a word and without running a single `finally`.
    ("import signal, time; signal.raise_signal(signal.SIGTERM); time.sleep(30)", 143, "stopped by SIGTERM.\n"),
])
def test_a_user_error_or_ctrl_c_is_one_line_on_stderr_and_its_own_exit_code(body, code, stderr):
    ended = run(body)
    assert (ended.returncode, ended.stdout, ended.stderr) == (code, "started\n", stderr)


def test_a_bug_is_not_hidden_it_keeps_its_traceback():
    ended = run("raise ValueError('a bug of ours')")
    assert ended.returncode == 1 and "Traceback" in ended.stderr and "ValueError: a bug of ours" in ended.stderr


def test_a_reader_that_leaves_ends_the_output_quietly():
    # `python -m minimobile.predict ... | head -1`: once head has its line, our next writes find the pipe
    # closed. Like `cat`, the tool stops without a word; Python alone would print a BrokenPipeError
    # traceback, and another "Exception ignored" when it flushes stdout at exit.
    body = "for i in range(100_000): print(f'line {i}')"
    reader = subprocess.Popen([sys.executable, "-c", PROGRAM.format(body=body)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    assert reader.stdout.readline() == "started\n"
    reader.stdout.close()                                               # what head does after its line
    assert reader.wait(timeout=60) == 1 and reader.stderr.read() == ""


def test_a_ctrl_c_that_lands_in_a_garbage_collector_callback_still_stops_the_program():
    # Python cannot raise out of a gc callback: it prints "Exception ignored in: <function ...>" and
    # drops the exception. JAX's callback runs at every collection, so a Ctrl-C handled while it ran
    # used to be lost, and the run went on to its end. The callback below meets a Ctrl-C that way
    # (raise_signal runs the handler at once, inside the callback).
    body = "\n    ".join([
        "import gc, signal, time",
        "def jax_like_callback(phase, info):",
        "    gc.callbacks.remove(jax_like_callback)",
        "    signal.raise_signal(signal.SIGINT)",
        "gc.callbacks.append(jax_like_callback)",
        "gc.collect()",
        "time.sleep(30)",
        "print('ran on as if no Ctrl-C had come')",
    ])
    ended = run(body)
    assert (ended.returncode, ended.stdout, ended.stderr) == (130, "started\n", "interrupted.\n")


def test_a_ctrl_c_while_a_tool_loads_jax_is_one_line_and_a_program_importing_us_keeps_its_signals():
    # While Python finds `python -m minimobile.train`, sys.argv[0] is "-m" and the package is imported:
    # from then on, through the tool's second or more of importing JAX, a Ctrl-C is one line, not a
    # traceback of the import machinery.
    while_loading = ("import sys; sys.argv[0] = '-m'; import minimobile, signal, time; "
                     "signal.raise_signal(signal.SIGINT); time.sleep(30)")
    ended = subprocess.run([sys.executable, "-c", while_loading], capture_output=True, text=True, timeout=60)
    assert (ended.returncode, ended.stderr) == (130, "interrupted.\n")
    imported = ("import signal; before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]; "
                "import minimobile; print(before == [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)])")
    ended = subprocess.run([sys.executable, "-c", imported], capture_output=True, text=True, timeout=60)
    assert ended.stdout == "True\n"
