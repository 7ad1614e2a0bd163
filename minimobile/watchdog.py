"""A multi-process run whose peer dies: turn JAX's crash into one sentence.

When one process of a `jax.distributed` run dies (preempted, killed, out of memory), the others
learn it from the coordination service once the dead one's heartbeat times out, and JAX then
aborts them from C++ with a page of log and a stack trace: bounded in time, but unreadable.
So the command line runs each process's training as a child of a small watchdog (this module):
the child's stderr (and, but for process 0's, its stdout) goes to `workdir/logs/process-<i>.log`
(process 0's warnings to the user as well), and if the child dies, the watchdog prints what
happened (its own error, a peer that died, a run that never assembled) and what to do, and exits
non-zero. Signals (SIGTERM, Ctrl-C) are
passed on to the child, which saves a checkpoint as usual.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

from minimobile import errors

CHILD_FLAG = "MINIMOBILE_WATCHED_CHILD"
STOPPED = {errors.stopped_by(signal.SIGINT), errors.stopped_by(signal.SIGTERM)}
PEER_DIED = ("another task died", "heartbeat timeout", "tasks are unhealthy", "Barrier failed",
             "Connection reset by peer")  # the last: a collective (gloo) whose peer process went away
NEVER_JOINED = "CoordinationService/RegisterTask"  # with DEADLINE_EXCEEDED: the run never assembled
TRACEBACK = "Traceback (most recent call last):"
CHAINED = ("The above exception was the direct cause of the following exception:",
           "During handling of the above exception, another exception occurred:")


def is_child() -> bool:
    return os.environ.get(CHILD_FLAG) == "1"


def run_watched(argv: list[str], workdir: str, process_id: int, peer_timeout_s: int) -> int:
    """Run `python -m minimobile.train *argv` as a watched child; returns the exit code to use."""
    log = pathlib.Path(workdir).expanduser() / "logs" / f"process-{process_id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as stderr:
        # Process 0 prints the run's progress; the others have nothing to say but gloo's chatter.
        stdout = None if process_id == 0 else stderr
        child = subprocess.Popen([sys.executable, "-m", "minimobile.train", *argv],
                                 env=dict(os.environ, **{CHILD_FLAG: "1"}), stdout=stdout, stderr=subprocess.PIPE,
                                 text=True, errors="replace")
        forward = lambda signum, frame: child.send_signal(signum)
        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for line in child.stderr:  # to the log; process 0's warnings (a damaged checkpoint...) to the user too
                stderr.write(line)
                stderr.flush()
                # And every process's "interrupted." (a signal before training began): its exit code
                # needs no explaining below, but the user at its terminal should see why it ended.
                if (process_id == 0 and line.startswith("warning: ")) or line.rstrip("\n") in STOPPED:
                    print(line, end="", file=sys.stderr, flush=True)
            code = child.wait()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
    if code in (0, 128 + signal.SIGTERM, 128 + signal.SIGINT):  # done, or stopped and saved (it said so)
        return code
    print(explain_failure(log.read_text(errors="replace"), code, process_id, peer_timeout_s, log), file=sys.stderr)
    return code if code > 0 else 1


def explain_failure(text: str, code: int, process_id: int, peer_timeout_s: int, log: pathlib.Path) -> str:
    """One sentence for a child that failed, from what it wrote (`text`, its log) and its exit code."""
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    sections = text.split(TRACEBACK)[1:]           # one per traceback printed
    raised = [line for line in (sections or [""])[-1].splitlines() if line and not line[0].isspace()]
    # The last traceback and what was logged after it (JAX's report of a dead peer), with the exceptions
    # it was raised from or while handling: a peer's death may show only there (orbax's barrier
    # TimeoutError is raised "from" the coordination service's error).
    chain = sections[-1:]
    while len(chain) < len(sections) and sections[-len(chain) - 1].rstrip().endswith(CHAINED):
        chain.insert(0, sections[-len(chain) - 1])
    if errors:  # the child's own one-sentence error
        return errors[-1]
    if raised and not any(marker in "".join(chain) for marker in (*PEER_DIED, NEVER_JOINED)):
        # A failure of its own (a bug of ours, say), not a peer's: say what it was.
        return f"error: process {process_id} failed ({raised[0]}); see {log}."
    if NEVER_JOINED in text:
        return (f"error: not every process of this run joined within {peer_timeout_s} s, so process {process_id} "
                "stopped; start all of them with the same --coordinator and --num-processes (and a larger "
                "--peer-timeout if they start far apart).")
    if any(marker in text for marker in PEER_DIED):
        return (f"error: another process of this run stopped answering for {peer_timeout_s} s (killed, preempted "
                f"or crashed), so process {process_id} stopped too; rerun the same command on every host to resume "
                f"from the last checkpoint (details in {log}).")
    if code < 0:  # killed by a signal it could not catch: SIGKILL is what the kernel's OOM killer sends
        oom = " (out of memory, perhaps: that is what the system sends then)" if code == -signal.SIGKILL else ""
        return (f"error: process {process_id} was killed by {signal.Signals(-code).name}{oom}; rerun the same "
                f"command to resume from the last checkpoint (details in {log}).")
    return f"error: process {process_id} stopped unexpectedly (exit code {code}); see {log}."
