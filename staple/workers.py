"""Worker processes serving one listening socket: what ``staple serve --workers N`` and
``staple.uvicorn.run(workers=N)`` both run.

The caller binds the socket once, in the parent, and :func:`run_workers` forks ``count``
children that inherit it; each child runs ``work()`` (its own event loop, its own stapler over
the shared store) and exits with what it returns. The children accept on the same socket, so
the kernel queues every connection once, in one backlog: ``port=0`` works, a connection
waiting in the queue survives the death of the worker that would have taken it, and no other
process can bind the port beside them (all three go wrong with ``SO_REUSEPORT``, which gives
each worker its own queue and lets any process of the same user join in).

Theory of operation, in the parent:

- SIGINT and SIGTERM are forwarded to the children as SIGTERM (each shuts down gracefully; a
  Ctrl-C from the terminal reaches them too), then the parent waits for all of them and
  returns 0;
- a child that dies while not stopping is replaced by a new one, after ``report`` says so; when
  children keep dying within :data:`QUICK_EXIT` seconds of their start (a crash loop: a bug,
  a store that kills them), from the second in a row each replacement waits longer
  (:func:`respawn_delay`: 0.1 s, doubling, at most 30 s) so that the machine is not spent
  forking; a child that lived longer resets that;
- a child exiting with ``startup_failure`` could not start (a bad certificate, a port problem,
  an app that fails its start-up): replacing it would fail the same way, so the parent stops
  the others and returns ``startup_failure``.

The signals are blocked around each ``fork`` so that a child never runs the parent's handler
(which would stop its siblings): the child restores the handlers the parent had before
:func:`run_workers`, then unblocks them, and a signal that came meanwhile is delivered then.
The parent must have no threads when it forks (a forked child gets only the forking thread).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any

__all__ = ["QUICK_EXIT", "Report", "describe_exit", "respawn_delay", "run_workers"]

Report = Callable[[int, str], None]
"""How the supervisor says what happens: ``report(logging.INFO, "worker 123 died ...")``."""

_SIGNALS = (signal.SIGINT, signal.SIGTERM)

QUICK_EXIT = 10.0
"""A child that dies within this many seconds of its start counts towards a crash loop."""
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 30.0
_PAUSE_SLICE = 0.1  # a backoff looks at `stopping` this often


def respawn_delay(quick_exits: int) -> float:
    """Seconds to wait before replacing a child, after ``quick_exits`` children in a row died
    within :data:`QUICK_EXIT` of their start: none for one (a worker killed once is replaced
    at once), then 0.1 s doubling, at most 30 s."""
    if quick_exits <= 1:
        return 0.0
    return min(_BACKOFF_FIRST * 2.0 ** min(quick_exits - 2, 64), _BACKOFF_MAX)


def run_workers(
    count: int,
    work: Callable[[], int],
    *,
    report: Report,
    startup_failure: int,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Fork ``count`` children running ``work()``, until SIGINT or SIGTERM; the exit status.

    Returns 0 after a stop by signal (whatever the children's statuses), or
    ``startup_failure`` when a child exited with it. ``work`` runs in the child, which exits
    with its result (1 for an exception, reported with its traceback; a ``SystemExit``'s
    code). Installs its signal handlers for the duration and restores the previous ones.
    ``clock`` and ``sleep`` time the children's lives and the crash-loop waits (tests give
    fake ones).
    """
    if count < 1:
        raise ValueError(f"count={count}: at least one worker process is needed")
    children: dict[int, float] = {}  # pid: when it was started (clock())
    stopping = False
    status = 0
    quick_exits = 0  # children in a row that died within QUICK_EXIT of their start

    def stop(sig: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in _SIGNALS}

    def spawn() -> None:
        pid = _fork(work, previous, report)
        children[pid] = clock()
        if stopping:  # the signal came while forking
            os.kill(pid, signal.SIGTERM)

    try:
        for _ in range(count):
            spawn()
        while children:
            pid, wait_status = os.waitpid(-1, 0)  # retried after a signal's handler (PEP 475)
            lived = clock() - children.pop(pid, 0.0)
            code = os.waitstatus_to_exitcode(wait_status)
            if stopping:
                continue
            if code == startup_failure:
                report(logging.ERROR, f"worker {pid} could not start; stopping")
                status = startup_failure
                stop(signal.SIGTERM, None)
                continue
            quick_exits = quick_exits + 1 if lived < QUICK_EXIT else 0
            delay = respawn_delay(quick_exits)
            if not delay:
                report(logging.WARNING, f"worker {pid} {describe_exit(code)}; starting another")
                spawn()
                continue
            report(
                logging.WARNING,
                f"worker {pid} {describe_exit(code)} {lived:.1f} s after its start, "
                f"{quick_exits} in a row within {QUICK_EXIT:g} s; starting another in "
                f"{delay:g} s",
            )
            deadline = clock() + delay
            while not stopping and (left := deadline - clock()) > 0:
                sleep(min(left, _PAUSE_SLICE))
            if not stopping:
                spawn()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status


def describe_exit(code: int) -> str:
    """``exited with status 1`` or ``was killed by SIGKILL``, from a ``waitstatus`` exit code."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with status {code}"


def _fork(work: Callable[[], int], handlers: dict[signal.Signals, Any], report: Report) -> int:
    """Fork one child running ``work``; its pid (in the parent). Never returns in the child."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        raise
    if pid:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        return pid
    code = 1
    try:
        for sig, handler in handlers.items():  # the parent's forwarding is not for us
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        code = work()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:
        detail = "".join(traceback.format_exception(exc)).rstrip()
        report(logging.ERROR, f"worker {os.getpid()} failed:\n{detail}")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
