"""Worker output plumbing: line splitting, partial lines, tails, process-tree scans."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from rdzv.launcher.logs import MAX_LINE, LogPump, format_prefix, read_tail
from rdzv.launcher.logs import _Sink as Sink
from rdzv.launcher.proctree import descendants, is_alive, process_table, read_proc
from tests.launcher.procs import wait_for


def test_sink_splits_lines_and_keeps_a_tail() -> None:
    printed: list[bytes] = []
    sink = Sink(console=printed.append, prefix=b"[7]: ", file=None, tail=None)
    sink.feed(b"a\nb", 0.0)
    assert printed == [b"[7]: a\n"]
    sink.feed(b"c\n\n", 0.0)
    assert printed == [b"[7]: a\n", b"[7]: bc\n", b"[7]: \n"]
    sink.feed(b"x" * (MAX_LINE + 5), 0.0)
    assert printed[-1] == b"[7]: " + b"x" * MAX_LINE + b"\n"
    sink.flush_partial(0.0)  # not old enough yet
    assert len(printed) == 4
    sink.flush_partial(1.0)
    assert printed[-1] == b"[7]: xxxxx\n"


def test_pump_prints_partial_lines_after_a_delay() -> None:
    printed: list[bytes] = []
    pump = LogPump()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-u",
            "-c",
            "import sys, time; sys.stdout.write('progress'); time.sleep(5)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        pump.add(proc.stdout, Sink(console=printed.append, prefix=b"> ", file=None, tail=None))
        started = time.monotonic()
        wait_for(lambda: printed == [b"> progress\n"], 10, "the partial line")
        assert time.monotonic() - started < 4  # printed long before the line ended
    finally:
        proc.kill()
        proc.wait()
        pump.close()


def test_prefix_template_and_tail(tmp_path: Path) -> None:
    assert (
        format_prefix(
            "[${role_name}${local_rank}|${rank}|${x}] ", rank=5, local_rank=1, role_name="trainer"
        )
        == b"[trainer1|5|${x}] "
    )
    path = tmp_path / "log"
    path.write_text("".join(f"line {i}\n" for i in range(100)))
    assert read_tail(path, 3) == ["line 97", "line 98", "line 99"]
    assert read_tail(tmp_path / "missing", 3) == []


def test_process_table_and_descendants() -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'], "
            "start_new_session=True); time.sleep(30)",
        ]
    )
    try:
        wait_for(lambda: len(descendants([child.pid], process_table())) == 1, 10, "grandchild")
        (grandchild,) = descendants([child.pid], process_table())
        info = read_proc(grandchild)
        assert info is not None and info.ppid == child.pid and info.sid == grandchild
        assert is_alive(grandchild, info.start)
        assert not is_alive(grandchild, info.start + 1)  # another process with the same pid
        assert os.getpid() in process_table()
    finally:
        for pid in descendants([child.pid], process_table()):
            os.kill(pid, 9)
        child.kill()
        child.wait()
