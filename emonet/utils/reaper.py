"""Nothing outlives its run: a watchdog process that ends what a run's main process
started once that process is gone, however it went (SIGKILL, the OOM killer, a crash in
native code, or a normal exit that left something behind).

A run starts processes of its own (Prefect's ephemeral API server, the face-visibility
pool's forkserver and workers, multiprocessing's resource tracker, DataLoader workers).
When the main process is killed with SIGKILL no handler of it runs, and those processes
are re-parented to init and live on. :func:`ensure_reaper` starts one small watchdog per
process (this file run as a script, in a session of its own so that a signal to the
run's process group leaves it to do its work). The watchdog notes the main process's
descendants twice a second; once the main process has ended, it gives them
:data:`EXIT_GRACE_S` to end by themselves (multiprocessing's forkserver and resource tracker
do so when their parent's pipe closes), then sends SIGTERM to every process it noted that is
still running (the same process: a pid is checked with its start
time), then SIGKILL to what is left after :data:`TERM_GRACE_S` seconds, and exits. A process
started in the last half second before the end is found too: the main process's environment
carries :data:`TOKEN_ENV`, which every process it starts from then on inherits (multiprocessing
starts its forkserver and resource tracker, and Prefect its server, as new programs with this
environment), and the watchdog looks for it in every process's environment.

So every process the main process started and left running is ended when it ends, also
what it started before its first flow run (in a notebook, the kernel's other children once
the kernel is gone). A process that detached itself (a daemon's double fork) is not its
descendant and is left alone, unless it carries the token.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import subprocess
import sys
import threading
import time

import psutil

logger = logging.getLogger(__name__)

__all__ = ["EXIT_GRACE_S", "POLL_S", "TERM_GRACE_S", "TOKEN_ENV", "ensure_reaper", "reap_orphans", "watch"]

# How often the watchdog notes the main process's descendants, in seconds.
POLL_S = 0.5
# How long the main process's children get to end by themselves once it has ended, in
# seconds: after a normal exit the forkserver, which holds the program's modules (see
# emonet.data.face_visibility), takes a few seconds to notice and finish.
EXIT_GRACE_S = 5.0
# How long processes get to end after SIGTERM before SIGKILL, in seconds.
TERM_GRACE_S = 5.0
# The environment variable naming the main process (pid:start time) whose watchdog ends
# a process when that main process is gone.
TOKEN_ENV = "EMONET_WATCHDOG_OF"

_started_for: int | None = None  # the pid the watchdog was started for (a fork gets its own)
_lock = threading.Lock()


def ensure_reaper() -> int | None:
    """Start this process's watchdog unless it runs already; returns its pid.

    Called at the start of every flow (cheap after the first call). None where the
    platform lacks what the watchdog needs (no ``/proc``: not Linux).
    """
    global _started_for
    with _lock:
        if _started_for == os.getpid():
            return None
        if not os.path.isdir("/proc"):
            return None
        me = psutil.Process()
        os.environ[TOKEN_ENV] = _token(me.pid, me.create_time())
        # This file run as a script (it imports only the standard library and psutil), so
        # the watchdog needs no emonet on its path; -P keeps this folder off sys.path.
        watchdog = subprocess.Popen(
            [sys.executable, "-P", os.path.abspath(__file__), str(me.pid), repr(me.create_time())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            # stderr stays: what it ends is said there. It exits within EXIT_GRACE_S +
            # TERM_GRACE_S + 1 s of the main process, so a caller reading the run's output
            # waits no longer.
            start_new_session=True,
            close_fds=True,
        )
        _started_for = me.pid
        logger.debug("watchdog %d ends what process %d leaves behind", watchdog.pid, me.pid)
        return watchdog.pid


def _token(pid: int, start_time: float) -> str:
    return f"{pid}:{start_time!r}"


def _carrying(token: str) -> list[psutil.Process]:
    """The processes (of this user) whose environment holds ``TOKEN_ENV=token``."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.environ().get(TOKEN_ENV) == token:
                found.append(process)
        except (psutil.Error, OSError):  # gone, or another user's
            continue
    return found


def _running(process: psutil.Process) -> bool:
    """Whether ``process`` (the same one: pid and start time) runs; a zombie, ended but not
    yet reaped by its new parent, does not."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _exited(parent: psutil.Process) -> bool:
    try:
        return not parent.is_running() or parent.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_for_exit(parent: psutil.Process, seen: dict[tuple[int, float], psutil.Process]) -> None:
    """Note ``parent``'s descendants into ``seen`` every :data:`POLL_S` until it has exited.

    A process seen once stays in ``seen`` while it runs, also once re-parented (a pool
    worker whose forkserver died first), and leaves it once it has ended.
    """
    try:
        pidfd = os.pidfd_open(parent.pid)  # readable once the process has exited (Linux 5.3)
    except (AttributeError, OSError):
        pidfd = None
    polls = 0
    try:
        while not _exited(parent):
            polls += 1
            if polls % 20 == 0:  # forget the ended ones (DataLoader workers come and go)
                for key in [key for key, process in seen.items() if not process.is_running()]:
                    del seen[key]
            try:
                for child in parent.children(recursive=True):
                    if child.pid != os.getpid():
                        seen.setdefault((child.pid, child.create_time()), child)
            except psutil.Error:  # the parent or a child went while we looked
                pass
            if pidfd is not None:
                select.select([pidfd], [], [], POLL_S)
            else:
                time.sleep(POLL_S)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def reap_orphans(processes: list[psutil.Process], grace_s: float = TERM_GRACE_S) -> list[str]:
    """SIGTERM each of ``processes`` still running (and what each started since), then
    SIGKILL what is left after ``grace_s``; returns a line per process ended."""
    alive: dict[int, psutil.Process] = {}
    for process in processes:
        try:
            if _running(process):  # the same process, not a reused pid, and not a zombie
                alive[process.pid] = process
                for child in process.children(recursive=True):
                    alive.setdefault(child.pid, child)
        except psutil.Error:
            continue
    alive.pop(os.getpid(), None)
    ended = []
    for process in alive.values():
        try:
            ended.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
            process.terminate()
        except psutil.Error:
            continue
    _, still = psutil.wait_procs(list(alive.values()), timeout=grace_s)
    for process in still:
        try:
            process.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(still, timeout=1.0)
    return ended


def watch(parent_pid: int, parent_start: float) -> int:
    """The watchdog's body: wait for ``parent_pid`` (started at ``parent_start``, from
    ``psutil``) to end, then end what it started; returns the number of processes ended."""
    seen: dict[tuple[int, float], psutil.Process] = {}
    try:
        parent = psutil.Process(parent_pid)
        if abs(parent.create_time() - parent_start) <= 1.0:
            _wait_for_exit(parent, seen)
        # else it ended before the watchdog started and its pid was reused
    except psutil.NoSuchProcess:  # it ended before the watchdog started: the token still finds what it left
        pass
    left = [*seen.values(), *_carrying(_token(parent_pid, parent_start))]
    deadline = time.monotonic() + EXIT_GRACE_S
    while (left := [process for process in left if _running(process)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    ended = reap_orphans(left)
    if ended:
        print(
            f"emonet watchdog: process {parent_pid} ended and left {len(ended)} processes running; ended them:",
            *ended,
            sep="\n  ",
            file=sys.stderr,
        )
    return len(ended)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="End what a process leaves running once it is gone.")
    parser.add_argument("pid", type=int)
    parser.add_argument("start_time", type=float, help="the process's start time, as psutil gives it")
    args = parser.parse_args(argv)
    # A signal to the run's process group (Ctrl-C, timeout) must not end the watchdog
    # before the run: it has its own session, and ignores SIGINT and SIGHUP too.
    import signal

    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    watch(args.pid, args.start_time)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
