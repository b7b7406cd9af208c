"""The worker supervisor (:mod:`staple.workers`): the crash-loop backoff, as a pure policy and
in real forked processes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from staple.workers import respawn_delay

ROOT = Path(__file__).resolve().parent.parent


def test_respawn_delay_doubles_from_a_tenth_of_a_second_to_thirty() -> None:
    assert [respawn_delay(n) for n in range(-1, 5)] == [0.0, 0.0, 0.0, 0.1, 0.2, 0.4]
    assert respawn_delay(10) == 25.6
    assert respawn_delay(11) == respawn_delay(10_000) == 30.0


# In a process of its own: run_workers forks and installs signal handlers. Its clock is a fake
# one kept in a file, so that the children can move it too: each wait of the supervisor adds
# its length, and the LONG-th child adds 100 s (a long life) before it exits. Every child
# exits 1 at once; the parent stops itself (SIGTERM) at the fourth report and prints them.
SUPERVISOR = """
import os, signal, sys
import staple.workers as workers

LONG, COUNTER, CLOCK = int(sys.argv[1]), sys.argv[2], sys.argv[3]
reports = []

def clock():
    with open(CLOCK) as f:
        return float(f.read() or 0)

def advance(seconds):
    now = clock() + seconds
    with open(CLOCK, "w") as f:
        f.write(repr(now))

def report(level, message):
    reports.append(message)
    if len(reports) == 4:
        os.kill(os.getpid(), signal.SIGTERM)

def work():
    with open(COUNTER, "a+") as f:
        f.write("x")
        f.seek(0)
        n = len(f.read())
    if n == LONG:
        advance(100.0)  # a life longer than QUICK_EXIT
    return 1

status = workers.run_workers(
    1, work, report=report, startup_failure=3, clock=clock, sleep=advance
)
print("\\n".join(reports))
sys.exit(status)
"""


def delays(long: int, tmp_path: Path) -> list[str]:
    """The waits the supervisor announced before each replacement ("" for none)."""
    clock = tmp_path / "clock"
    clock.write_text("0")
    proc = subprocess.run(
        [sys.executable, "-c", SUPERVISOR, str(long), str(tmp_path / "n"), str(clock)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 4 and all("exited with status 1" in line for line in lines), lines
    return [
        m.group(1) if (m := re.search(r"starting another in (\S+) s$", x)) else "" for x in lines
    ]


@pytest.mark.slow
def test_a_crash_loop_backs_off(tmp_path: Path) -> None:
    """Children dying at once: the first is replaced at once, the next after 0.1, 0.2, 0.4 s."""
    assert delays(0, tmp_path) == ["", "0.1", "0.2", "0.4"]


@pytest.mark.slow
def test_a_child_that_lived_resets_the_backoff(tmp_path: Path) -> None:
    """The twin: the third child lives past QUICK_EXIT, so it is replaced at once and the
    count starts again (without the reset: 0.2, then 0.4)."""
    assert delays(3, tmp_path) == ["", "0.1", "", ""]
