"""Benchmark: the store at the descriptor limit, ~15,000 ranks doing ``init_process_group``.

Every simulated rank does against the store what torch's ``init_process_group`` (TCPStore
rendezvous) does: connect, VALIDATE + PING (the client's handshake), then ``add`` on a shared
counter; the rank whose ``add`` returns the world size sets a 64-byte id, and every rank
waits for that key and reads it. The ranks are raw asyncio connections (uvloop) speaking the
TCPStore wire protocol with :mod:`rdzv.wire`'s codec, spread over worker processes (one
process holds at most ~19,000 descriptors here); a torch client per rank would make the
harness the bottleneck.

Servers, each in its own process so its CPU seconds and memory are its own (``/proc``):

- ``rdzv``: ``python -m rdzv serve``;
- ``torch``: ``torch.distributed.TCPStore(..., is_master=True, use_libuv=True)``, run in a
  mount namespace whose ``/etc/resolv.conf`` names ``nameserver 127.0.0.1`` (its reverse DNS
  lookup per accepted connection fails at once: the fair figure). Needs root for ``unshare``;
- ``torch-plain``: torch's server with the machine's resolver (here unreachable: every
  accepted connection waits for a lookup to time out), at ``--plain-ranks`` ranks only.

    python bench/init_storm.py [--ranks 15000] [--procs 4] [--servers rdzv,torch,torch-plain]
        [--plain-ranks 100] [--repeat 1] [--profile DIR]

Figures per server: ``connect_s`` from the release to the last rank's PING reply (all ranks
connect at once); ``add_wait_get_s`` from the second release (all connected) to the last
rank holding the id; the server's CPU seconds per phase (``server_cpu_*``: user + system,
nanosecond resolution; ``server_user_*``: user alone, the server's own code, clock ticks);
``client_cpu_*``: the CPU seconds of the client processes per phase (they share the
machine's cores with the server, so a phase lasts at least the sum over the cores);
``listen_overflows``: connection attempts the machine dropped on a full listen queue during
the connect phase (each costs its rank a SYN retransmit, 1 s); ``idle_rss_mb``,
``peak_rss_mb`` (VmHWM) and ``rss_per_conn_bytes`` (RSS growth from idle to all connected,
per connection).
``--profile DIR``: ``py-spy record`` samples the server during the trial and writes its
collapsed stacks (one file per phase, ``DIR/<server>-<phase>.txt``).

Prints one JSON document (machine, load, workload, results).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import signal
import struct
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from children import listening_port, receive
from procstat import cpu_ns, memory_bytes, user_seconds

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO / "src") not in sys.path:
    sys.path.insert(0, str(_REPO / "src"))

from rdzv import wire  # noqa: E402

HOST = "127.0.0.1"
COUNTER = b"/init/storm/counter"
ID_KEY = b"/init/storm/id"
ID_VALUE = bytes(range(64))

_TORCH_SERVER = """
import sys, time, datetime
import torch.distributed as dist
store = dist.TCPStore("127.0.0.1", 0, is_master=True, use_libuv=True,
                      wait_for_workers=False, timeout=datetime.timedelta(seconds=600))
print(f"listening on 127.0.0.1:{store.port}", flush=True)
while True:
    time.sleep(3600)
"""


# ---------------------------------------------------------------------------- the servers
class Server:
    """A store server in a child process, with its CPU seconds and memory from /proc."""

    def __init__(self, kind: str, workdir: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(_REPO / "src"))
        if kind == "rdzv":
            argv = [sys.executable, "-m", "rdzv", "serve", "--host", HOST, "--port", "0"]
        else:
            script = workdir / "torch_server.py"
            script.write_text(_TORCH_SERVER)
            argv = [sys.executable, str(script)]
            if kind == "torch":
                resolv = workdir / "resolv.conf"
                resolv.write_text("nameserver 127.0.0.1\n")
                inner = f"mount --bind {resolv} /etc/resolv.conf && exec {' '.join(argv)}"
                argv = ["unshare", "-m", "sh", "-c", inner]  # exec: the pid is python's
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
        )
        self.port = listening_port(self.proc, f"the {kind} server")

    def cpu(self) -> float:
        return cpu_ns(self.proc.pid) / 1e9  # ns resolution: a phase lasts well under 1 s

    def user(self) -> float:
        return user_seconds(self.proc.pid)

    def mem(self, field: str) -> int:
        """``VmRSS`` or ``VmHWM`` in bytes."""
        return memory_bytes(self.proc.pid, field)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(30)


def listen_overflows() -> int:
    """The machine's count of connection attempts dropped because a listen queue was full
    (``TcpExt ListenOverflows``, /proc/net/netstat); each costs its client a SYN retransmit
    (1 s on Linux)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=True):  # a header, its values
        if names.startswith("TcpExt:"):
            fields = zip(names.split()[1:], map(int, values.split()[1:]), strict=True)
            return dict(fields)["ListenOverflows"]
    raise KeyError("ListenOverflows")


# ---------------------------------------------------------------------------- a rank
class Rank(asyncio.Protocol):
    """One rank's connection: requests written whole, replies awaited by their size."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.need = 0
        self.waiter: asyncio.Future[bytes] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport) or hasattr(transport, "write")
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._check()

    def _check(self) -> None:
        if self.waiter is not None and len(self.buf) >= self.need:
            reply = bytes(self.buf[: self.need])
            del self.buf[: self.need]
            waiter, self.waiter = self.waiter, None
            waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))

    async def call(self, frame: bytes, reply: int) -> bytes:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.need = reply
        self.transport.write(frame)
        self._check()
        return await self.waiter


async def _worker_main(port: int, count: int, world: int, pipe: Connection) -> None:
    loop = asyncio.get_running_loop()
    recv = lambda: loop.run_in_executor(None, pipe.recv)  # noqa: E731 - keeps the loop running
    validate, ping = wire.encode_validate(), wire.encode_ping(0x1234)
    add = wire.encode_key_int(wire.Op.ADD, COUNTER, 1)
    set_id = wire.encode_set(ID_KEY, ID_VALUE)
    wait = wire.encode_keys(wire.Op.WAIT, [ID_KEY])
    get = wire.encode_key(wire.Op.GET, ID_KEY)

    async def connect() -> Rank:
        _, rank = await loop.create_connection(Rank, HOST, port)
        assert rank.transport is not None
        rank.transport.write(validate)  # torch's client: two writes, VALIDATE then PING
        await rank.call(ping, 4)
        return rank

    async def init(rank: Rank) -> bytes:
        (value,) = struct.unpack("<q", await rank.call(add, 8))
        if value == world:
            assert rank.transport is not None
            rank.transport.write(set_id)
        await rank.call(wait, 1)
        blob = await rank.call(get, 8 + len(ID_VALUE))
        return blob[8:]

    pipe.send("ready")
    assert await recv() == "connect"
    cpu = time.process_time()
    ranks = await asyncio.gather(*(connect() for _ in range(count)))
    connected = time.monotonic()
    pipe.send({"done": connected, "cpu": time.process_time() - cpu})
    assert await recv() == "init"
    cpu = time.process_time()
    ids = await asyncio.gather(*(init(rank) for rank in ranks))
    done, cpu = time.monotonic(), time.process_time() - cpu
    pipe.send({"done": done, "cpu": cpu, "wrong": sum(1 for i in ids if i != ID_VALUE)})
    await recv()
    os._exit(0)  # no orderly goodbye for thousands of connections


def _worker(port: int, count: int, world: int, pipe: Connection) -> None:
    import uvloop

    try:
        uvloop.run(_worker_main(port, count, world, pipe))
    except BaseException as exc:  # reported to the parent, which fails the trial with it
        pipe.send({"error": f"{type(exc).__name__}: {exc}"})
        raise


# ---------------------------------------------------------------------------- one trial
class Profiler:
    """``py-spy record`` on the server, one collapsed-stacks file per phase."""

    def __init__(self, directory: Path | None, server: Server, kind: str) -> None:
        self.directory, self.server, self.kind = directory, server, kind
        self.proc: subprocess.Popen[bytes] | None = None

    def phase(self, name: str) -> None:
        self.stop()
        if self.directory is None:
            return
        out = self.directory / f"{self.kind}-{name}.txt"
        argv = ["py-spy", "record", "--format", "raw", "--rate", "250", "--nonblocking"]
        argv += ["--pid", str(self.server.proc.pid), "-o", str(out)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # py-spy attaches

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(30)
            self.proc = None


def trial(
    kind: str, ranks: int, procs: int, timeout: float, profile: Path | None = None
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(kind, Path(tmp))
        profiler = Profiler(profile, server, kind)
        try:
            return _trial(server, kind, ranks, procs, timeout, profiler)
        finally:
            profiler.stop()
            server.stop()


def _trial(
    server: Server, kind: str, ranks: int, procs: int, timeout: float, profiler: Profiler
) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    shares = [ranks // procs + (1 if i < ranks % procs else 0) for i in range(procs)]
    pipes, workers = [], []
    for share in shares:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(server.port, share, ranks, child), daemon=True)
        proc.start()
        pipes.append(parent)
        workers.append(proc)
    try:
        for pipe in pipes:
            assert receive(pipe, 60) == "ready"
        time.sleep(0.5)  # the workers idle: the server's idle RSS
        profiler.phase("connect")
        idle_rss, cpu0, user0 = server.mem("VmRSS"), server.cpu(), server.user()
        overflows = listen_overflows()
        start = time.monotonic()
        for pipe in pipes:
            pipe.send("connect")
        connects = [receive(pipe, timeout) for pipe in pipes]
        connected = max(r["done"] for r in connects)
        cpu1, user1, conn_rss = server.cpu(), server.user(), server.mem("VmRSS")
        overflows = listen_overflows() - overflows
        profiler.phase("add_wait_get")
        cpu1b, user1b = server.cpu(), server.user()
        start2 = time.monotonic()
        for pipe in pipes:
            pipe.send("init")
        reports = [receive(pipe, timeout) for pipe in pipes]
        done = max(r["done"] for r in reports)
        cpu2, user2 = server.cpu(), server.user()
        profiler.stop()
        for pipe in pipes:
            pipe.send("exit")
        return {
            "server": kind,
            "ranks": ranks,
            "connect_s": round(connected - start, 3),
            "add_wait_get_s": round(done - start2, 3),
            "wrong_ids": sum(r["wrong"] for r in reports),
            "server_cpu_connect_s": round(cpu1 - cpu0, 3),
            "server_cpu_add_wait_get_s": round(cpu2 - cpu1b, 3),
            "server_user_connect_s": round(user1 - user0, 2),
            "server_user_add_wait_get_s": round(user2 - user1b, 2),
            "listen_overflows": overflows,
            "client_cpu_connect_s": round(sum(r["cpu"] for r in connects), 2),
            "client_cpu_add_wait_get_s": round(sum(r["cpu"] for r in reports), 2),
            "idle_rss_mb": round(idle_rss / 2**20, 1),
            "peak_rss_mb": round(server.mem("VmHWM") / 2**20, 1),
            "rss_per_conn_bytes": round((conn_rss - idle_rss) / ranks),
        }
    finally:
        for proc in workers:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


def machine() -> dict[str, Any]:
    import uvloop

    from rdzv.server import fastpath

    one, five, _ = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "uvloop": uvloop.__version__,
        "rdzv_fastpath": fastpath.AVAILABLE and fastpath.ENABLED,
        "somaxconn": int(Path("/proc/sys/net/core/somaxconn").read_text()),
        "loadavg_1m": round(one, 2),
        "loadavg_5m": round(five, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=15000)
    parser.add_argument("--procs", type=int, default=4, help="client worker processes")
    parser.add_argument("--servers", default="rdzv,torch,torch-plain")
    parser.add_argument("--plain-ranks", type=int, default=100, help="ranks for torch-plain")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per phase")
    parser.add_argument("--profile", type=Path, help="write py-spy's stacks of the server here")
    args = parser.parse_args()
    results = []
    for _ in range(args.repeat):
        for kind in args.servers.split(","):
            n = args.plain_ranks if kind == "torch-plain" else args.ranks
            procs = min(args.procs, n)
            try:
                result = trial(kind, n, procs, args.timeout, args.profile)
                results.append(result | {"procs": procs})
            except (RuntimeError, TimeoutError) as exc:
                results.append({"server": kind, "ranks": n, "error": str(exc)})
    print(
        json.dumps(
            {
                "benchmark": "init_storm",
                "workload": {
                    "ranks": args.ranks,
                    "procs": args.procs,
                    "per_rank": "connect, VALIDATE, PING, ADD; last SET 64 B; WAIT, GET",
                },
                "machine": machine(),
                "results": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
