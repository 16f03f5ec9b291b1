"""Heartbeat channel, hang verdicts and stack dumps (real worker processes)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from rdzv.launcher import hangs
from rdzv.launcher.hangs import HangMonitor, dump_stacks, innermost_frame
from rdzv.launcher.heartbeat import HEARTBEAT_FILE_ENV, STACKS_FILE_ENV, STACKS_SIGNAL_ENV
from tests.conftest import subprocess_env

WORKER = r"""
import sys, time
import rdzv
steps = int(sys.argv[1])
for step in range(steps):
    rdzv.heartbeat(step)
rdzv.heartbeat()  # a beat without a step keeps the last step given
def stuck():
    print("beating done", flush=True)  # from inside: a dump taken now shows this frame
    time.sleep(60)
stuck()
"""


def _start(tmp_path: Path, monitor: HangMonitor, steps: int) -> subprocess.Popen[str]:
    script = tmp_path / "w.py"
    script.write_text(WORKER)
    env = subprocess_env()
    env[HEARTBEAT_FILE_ENV] = str(monitor.path(0))
    env[STACKS_FILE_ENV] = str(tmp_path / "stacks.txt")
    env[STACKS_SIGNAL_ENV] = "SIGUSR2"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(steps)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "beating done"
    return proc


def test_hang_verdict_after_timeout_only_for_a_worker_that_beat(tmp_path: Path) -> None:
    (tmp_path / "0").mkdir()
    (tmp_path / "1").mkdir()
    monitor = HangMonitor([tmp_path / "0", tmp_path / "1"], timeout=5.0)
    proc = _start(tmp_path, monitor, 42)
    try:
        t0 = time.monotonic()
        assert monitor.check(t0) == []  # first sight of the count: it moved
        assert monitor.check(t0 + 4.9) == []
        hung = monitor.check(t0 + 5.0)
        # Local rank 1 never beat: never hung, however long.
        assert [(h.local_rank, h.beats, h.last_step) for h in hung] == [(0, 43, 41)]
        assert monitor.check(t0 + 5.0, running={1}) == []
    finally:
        proc.kill()
        proc.wait()
        monitor.close()


@pytest.mark.parametrize("tool", ["py-spy", "faulthandler"])
def test_stacks_show_the_stuck_frame(
    tmp_path: Path, tool: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if tool == "faulthandler":
        monkeypatch.setattr(hangs.shutil, "which", lambda name: None)
    else:
        assert hangs.shutil.which("py-spy"), "py-spy is a test dependency"
    (tmp_path / "0").mkdir()
    monitor = HangMonitor([tmp_path / "0"], timeout=1.0)
    proc = _start(tmp_path, monitor, 3)
    try:
        out = dump_stacks([(5, 0, proc.pid, tmp_path / "stacks.txt")], tmp_path / "dump.txt")
        text = out.read_text()
        assert text.startswith(f"=== rank 5 (local rank 0, pid {proc.pid}) ===")
        assert f"({tool})" in text
        frame = innermost_frame(text)
        assert frame is not None and frame.startswith("stuck (") and "w.py:" in frame
    finally:
        proc.kill()
        proc.wait()
        monitor.close()


def test_heartbeat_is_a_no_op_outside_rdzv_run_and_checks_its_step(tmp_path: Path) -> None:
    code = (
        "import rdzv\n"
        "rdzv.heartbeat(); rdzv.heartbeat(3)\n"
        "try:\n"
        "    rdzv.heartbeat('x')\n"
        "except TypeError as e:\n"
        "    print('TypeError', e)\n"
    )
    env = subprocess_env()
    env.pop(HEARTBEAT_FILE_ENV, None)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    # Outside rdzv run even a bad step is not looked at: the call returns at once.
    assert done.returncode == 0 and done.stdout == "", done.stderr
    (tmp_path / "0").mkdir()
    monitor = HangMonitor([tmp_path / "0"], timeout=1.0)
    env[HEARTBEAT_FILE_ENV] = str(monitor.path(0))
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    assert "TypeError rdzv.heartbeat(): step must be an int or None, not str" in done.stdout
    monitor.close()


def test_hang_timeout_below_the_monitor_interval_is_a_usage_error() -> None:
    from rdzv.launcher.config import LaunchConfig

    with pytest.raises(ValueError, match=r"--hang-timeout 0\.05 is below --monitor-interval 0\.1"):
        LaunchConfig(hang_timeout=0.05)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "rdzv",
            "run",
            "--standalone",
            "--hang-timeout",
            "0.01",
            "--monitor-interval",
            "1",
            "x.py",
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "--hang-timeout 0.01 is below --monitor-interval 1" in done.stderr
