"""The watchdog helper: kills registered process groups when the agent's pipe closes without
``exit``, and nothing otherwise."""

from __future__ import annotations

import subprocess
import sys

from rdzv.launcher.proctree import read_proc
from rdzv.launcher.watchdog import Watchdog

_SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def _group() -> subprocess.Popen[bytes]:
    return subprocess.Popen(_SLEEPER, start_new_session=True)


def _start(proc: subprocess.Popen[bytes]) -> int | None:
    info = read_proc(proc.pid)
    return None if info is None else info.start


def test_agent_death_kills_registered_groups_only() -> None:
    dog = Watchdog()
    registered, forgotten, stranger = _group(), _group(), _group()
    try:
        dog.add(registered.pid, _start(registered))
        dog.add(forgotten.pid, _start(forgotten))
        dog.remove(forgotten.pid)
        dog.add(stranger.pid, 12345)  # a start time that is not this process's: pid reused
        # What the kernel does when the agent dies: the helper's stdin reaches EOF.
        assert dog._proc is not None and dog._proc.stdin is not None
        dog._proc.stdin.close()
        dog._proc.wait(10)
        assert registered.wait(10) == -9
        assert forgotten.poll() is None and stranger.poll() is None
    finally:
        for proc in (registered, forgotten, stranger):
            proc.kill()
            proc.wait()


def test_clean_exit_kills_nothing() -> None:
    dog = Watchdog()
    group = _group()
    try:
        dog.add(group.pid, _start(group))
        helper = dog._proc
        dog.close()
        assert helper is not None and helper.returncode == 0  # ended: it can kill no more
        assert group.poll() is None
    finally:
        group.kill()
        group.wait()
