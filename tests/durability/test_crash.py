"""kill -9 of ``rdzv serve --data-dir`` under load, then a restart on the same port."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rdzv.engine import Engine
from rdzv.server.persistence import recover
from rdzv.store.tcp import TCPStore
from tests.conftest import subprocess_env
from tests.rendezvous.conftest import ProcNode

WRITERS = 4
WRITES = 2500  # per writer: 10,000 in all


def start_server(
    data_dir: Path, port: int = 0, fsync: str = "always"
) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rdzv", "serve", "--port", str(port), "--quiet",
         "--data-dir", str(data_dir), "--fsync", fsync],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=subprocess_env(),
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("listening on "), f"rdzv serve did not start: {line!r}"
    return proc, int(line.rsplit(":", 1)[1])


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        stop(proc)


class Writer:
    def __init__(self, port: int, ident: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.durability.writer_proc", str(port), str(ident),
             str(WRITES)],
            stdout=subprocess.PIPE, text=True, env=subprocess_env(),
        )  # fmt: skip
        self.acked = -1
        self.done = False
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            word, _, arg = line.strip().partition(" ")
            if word == "acked":
                self.acked = int(arg)
            elif word == "done":
                self.done = True


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.005)


@pytest.mark.parametrize("fsync", ["always", "never"])
def test_kill_9_under_load_keeps_acknowledged_writes_and_clients_finish(
    tmp_path: Path, procs: list[subprocess.Popen[str]], fsync: str
) -> None:
    server, port = start_server(tmp_path, fsync=fsync)
    procs.append(server)
    writers = [Writer(port, i) for i in range(WRITERS)]
    procs.extend(w.proc for w in writers)
    wait_until(lambda: all(w.acked >= WRITES // 5 for w in writers), 60, "writers at 20 %")
    server.send_signal(signal.SIGKILL)
    server.wait(10)
    acked = [w.acked for w in writers]
    assert not all(w.done for w in writers), "the kill came too late to test anything"
    # Every write acknowledged before the kill is in the data directory.
    engine = Engine()
    recover(tmp_path, engine)
    for i, last in enumerate(acked):
        for j in range(last + 1):
            assert engine.get(f"/w{i}/{j}".encode()) == str(j).encode(), (i, j, last)
    # Restart on the same port: the writers reconnect, replay and finish.
    server, again = start_server(tmp_path, port, fsync)
    procs.append(server)
    assert again == port
    for w in writers:
        assert w.proc.wait(90) == 0
    assert all(w.done for w in writers)
    store = TCPStore("127.0.0.1", port, timeout=10)
    assert store.num_keys() == WRITERS * WRITES
    for i in range(WRITERS):
        keys = [f"w{i}/{j}" for j in range(WRITES)]
        assert store.multi_get(keys) == [str(j).encode() for j in range(WRITES)]
    store.close()


def test_dynamic_rendezvous_completes_across_a_server_restart(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    server, port = start_server(tmp_path)
    procs.append(server)
    spec = {"kind": "tcp", "host": "127.0.0.1", "port": port}
    nodes: list[ProcNode] = []
    try:
        for index in range(3):
            config = {
                "store": spec, "run_id": "job", "min": 3, "max": 3, "interval": 0.5,
                "attempts": 20, "last_call": 0.3, "join": 90,
                "local_addr": f"127.0.0.{index + 1}",
            }  # fmt: skip
            nodes.append(ProcNode(config))
        nodes[0].send("join")
        nodes[1].send("join")
        for node in nodes[:2]:  # both registered and waiting for a third node
            node.expect("rdzv", timeout=30)
        probe = TCPStore("127.0.0.1", port, timeout=10, reconnect=False)
        slots = ["rdzv/job/r0/hb/1", "rdzv/job/r0/hb/2"]  # both hold a slot of round 0
        wait_until(lambda: probe.check(slots), 30, "two nodes in round 0")
        probe.close()
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        server, _ = start_server(tmp_path, port)
        procs.append(server)
        nodes[2].send("join")
        joined = [node.expect("joined", "error", timeout=60) for node in nodes]
        assert [m["event"] for m in joined] == ["joined"] * 3, joined
        assert sorted(m["rank"] for m in joined) == [0, 1, 2]
        assert {m["world"] for m in joined} == {3}
    finally:
        for node in nodes:
            node.close()
