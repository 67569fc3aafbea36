"""A process-wide request to stop training at its next safe point, and the SIGTERM /
SIGINT handlers that make one.

A scheduler, a container runtime or ``timeout`` stops a job with SIGTERM to its whole
process group; a user presses Ctrl-C (SIGINT). Raising at whatever line the signal
lands on could interrupt a checkpoint write or an optimizer step, so while
:func:`stop_on_signals` is active a signal only records a request, and
:func:`emonet.training.trainer.fit` honours it between batches and between epochs
(:func:`check_stop`): it raises :class:`TrainingStopped`, leaving ``last.pt`` as the
last completed epoch wrote it (atomically), to resume from. A second signal stops at
once (the files are still whole: every write is atomic).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

logger = logging.getLogger(__name__)

__all__ = [
    "TrainingStopped",
    "check_stop",
    "clear_stop",
    "mark_stop_handled",
    "on_stop_requested",
    "request_stop",
    "stop_on_signals",
    "stop_requested",
    "wait_stop_handled",
]

_reason: str | None = None  # why a stop was requested; None while none is
_listeners: list[Callable[[str], object]] = []
_handled = threading.Event()  # set once a requested stop has been handled (mark_stop_handled)


class TrainingStopped(BaseException):
    """Training ended early because a stop was requested (see :func:`request_stop`).

    A ``BaseException``, like ``KeyboardInterrupt``: a stop is not an error to retry or
    to swallow in an ``except Exception`` (Prefect retries a task on ``Exception``,
    never on this). ``reason`` says why (``"SIGTERM received"``).
    """

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message or reason)
        self.reason = reason


def request_stop(reason: str) -> None:
    """Ask training to stop at its next safe point; the first reason given is kept and
    passed to every :func:`on_stop_requested` listener."""
    global _reason
    if _reason is None:
        _reason = reason
        for listener in _listeners:
            listener(reason)


@contextmanager
def on_stop_requested(listener: Callable[[str], object]) -> Iterator[None]:
    """While active, call ``listener(reason)`` when a stop is first requested (maybe
    from a signal handler: keep it short). A command-line entry point uses it to bound
    how long the process may take to end; a library never needs it."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def stop_requested() -> str | None:
    """The reason of the pending stop request, or None."""
    return _reason


def clear_stop() -> None:
    """Forget a stop request (a new run in the same process starts without one)."""
    global _reason
    _reason = None
    _handled.clear()


def mark_stop_handled() -> None:
    """Say that what a stop had to save is saved (training stopped at a safe point, the
    run's records closed): a process that waits to exit after a stop may exit now."""
    _handled.set()


def wait_stop_handled(timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for :func:`mark_stop_handled`; whether it came."""
    return _handled.wait(timeout)


def check_stop(where: str) -> None:
    """Raise :class:`TrainingStopped` if a stop was requested; ``where`` ends up in its message.

    Raises
    ------
    TrainingStopped
        Naming the reason and ``where`` (e.g. ``"during epoch 3, before batch 1"``).
    """
    if _reason is not None:
        raise TrainingStopped(_reason, f"training stopped ({_reason}) {where}")


@contextmanager
def stop_on_signals(signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """While active, the first of ``signals`` requests a stop and the second raises
    :class:`TrainingStopped` at once; the previous handlers (Prefect's SIGTERM bridge,
    Python's ``KeyboardInterrupt``) are put back on exit.

    A request the block did not act on (it came after its last check) raises
    :class:`TrainingStopped` on exit, and so does any exception the block raises while a
    stop is pending. Clears any earlier request on entry. Outside the main thread, where
    Python cannot install signal handlers, it changes nothing (the signals keep their
    handlers).
    """
    clear_stop()
    if threading.current_thread() is not threading.main_thread():
        logger.debug("not the main thread: SIGTERM/SIGINT keep their handlers")
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if _reason is not None:
            raise TrainingStopped(_reason, f"training stopped at once ({name} after {_reason})")
        request_stop(f"{name} received")
        logger.warning("%s received: training stops at the next batch (send it again to stop at once)", name)

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    except Exception as error:
        # Whatever broke while a stop was pending (say, a DataLoader worker outside this
        # process group's control killed by the same signal) is part of the stop.
        if _reason is not None:
            raise TrainingStopped(_reason, f"training stopped ({_reason}): {error}") from error
        raise
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    # A request that came after the block's last safe point still stops the caller.
    check_stop("after its last safe point")
