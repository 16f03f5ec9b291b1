"""TCPStore server benchmark: torch's C++ server vs ``rdzv serve``, same clients, one run.

Workload: every client loops over ``set(key, 64-byte value)`` then ``get(key)`` (torch's
client sends WAIT + GET for a get: two round trips) on its own 100 keys, for a fixed time.
Clients are ``torch.distributed.TCPStore`` objects (C++; they release the GIL while they
wait) spread over a few client processes, each running several client threads. Each server
runs in a process of its own: (a) torch's default (libuv) server, (b) ``rdzv serve`` with
its defaults (uvloop, the C fast path when built and busy polling, see ``rdzv.server.fastpath``),
and with ``--variants`` (c) ``rdzv serve --busy-poll-us 0`` and (d) ``rdzv serve`` with the
fast path off. Then rdzv's Python client against rdzv's server, for reference.

Prints one JSON document: ops/s (an op is one ``set`` or one ``get`` call), p50 and p99
latency per call in microseconds, and the rdzv/torch throughput ratio per client count.

Usage (from the repository root)::

    python bench/store_ops.py [--clients 1 16 64] [--seconds 3] [--procs 4] [--repeats 3]
                              [--variants]
    python bench/store_ops.py --security [--python-clients 1 16] [--seconds 3] [--repeats 3]

``--security`` instead measures the cost of authentication and TLS (``security_main``):
rdzv's Python client against ``rdzv serve`` with neither, a token, TLS, and both; connect
time (handshake included) and the set/get loop.

``--metrics`` measures instead the cost of ``rdzv serve --metrics-port`` (request counting
and timing, in C on the fast path) with torch's clients: the server without metrics, with
metrics scraped every 100 ms (Prometheus scrapes every 15 s; 100 ms is a stress), and
scraped 1,000 times a second (one keep-alive scraper, raw socket); and a control: the
server without metrics while a ticker wakes 1,000 times a second and sends nothing (what
any process waking that often costs the store's clients here). Both servers run for the
whole client count, the same client connections to each; the variants take turns in short
phases (order rotated every repeat; the idle server is stopped with SIGSTOP), so a shared
machine's drifting load hits all of them alike. Per variant: the median phase, and the
median and spread of the per-repeat throughput ratio over no metrics; the CPU per op of the
store process, the listener process and the scraper (scheduler nanoseconds); the CPU of one
scrape without load (``scrape_cost_without_load``). A second server without metrics is an
A/A control. Paired variants split the clients over two servers at once (no metrics and
metrics scraped every 100 ms; the A/A pair): the same moment's load hits both, so their
ratio is immune to other tenants (the listener's and scraper's CPU slows both alike: it is
in their CPU per op instead)::

    python bench/store_ops.py --metrics [--clients 1 16 64] [--seconds 1] [--repeats 15]
                              [--profile]

``--profile`` adds where the store process spends its CPU with and without metrics (Linux
``perf``, software sampling; ``counting_profile``).

``--durability`` measures instead the cost of ``rdzv serve --data-dir`` (fsync always,
interval, never) against the in-memory server, with rdzv's Python client (same workload;
every get's reply waits for the group commit of the set before it)::

    python bench/store_ops.py --durability [--durability-clients 1 16] [--seconds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from procstat import cpu_ns

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"
VALUE = b"v" * 64
KEYS_PER_CLIENT = 100
SAMPLE_EVERY = 7  # keep one latency in SAMPLE_EVERY to bound the report size


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    return env


# --------------------------------------------------------------------------- servers
TORCH_SERVER = """
import sys, time, datetime
import torch.distributed as dist
s = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                  timeout=datetime.timedelta(seconds=600))
print(f"listening on 127.0.0.1:{s.port}", flush=True)
sys.stdin.read()
"""


def start_server(kind: str, extra: Sequence[str] = ()) -> tuple[subprocess.Popen[str], int]:
    """Start a server process (``extra``: more ``rdzv serve`` arguments; with
    ``--metrics-port``, read the status page line with :func:`metrics_url`)."""
    env = _env()
    if kind == "torch":
        cmd = [sys.executable, "-c", TORCH_SERVER]
    else:
        cmd = [sys.executable, "-m", "rdzv", "serve", "--port", "0", "--quiet", *extra]
        if kind == "rdzv-python":  # rdzv serve without its C fast path (rdzv.server.fastpath)
            env["RDZV_FASTPATH"] = "0"
        elif kind == "rdzv-nopoll":  # without busy polling (rdzv.server.fastpath.BusyPoller)
            cmd += ["--busy-poll-us", "0"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise RuntimeError(f"{kind} server did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


def metrics_url(proc: subprocess.Popen[str]) -> str:
    """The /metrics URL ``rdzv serve --metrics-port`` printed after its endpoint."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("status page on "):
        raise RuntimeError(f"rdzv serve printed no status page URL: {line!r}")
    return line.split()[3] + "metrics"


def read_reply(sock: socket.socket, buffer: bytearray) -> int:
    """Read one HTTP reply (with Content-Length) from ``sock``; bytes beyond it stay in
    ``buffer``. Returns its status code."""
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            at = buffer.find(b"\r\nContent-Length: ", 0, end)
            if at < 0:
                raise RuntimeError(f"reply without Content-Length: {bytes(buffer[:200])!r}")
            length = int(buffer[at + 18 : buffer.index(b"\r\n", at + 18)])
            if len(buffer) >= end + 4 + length:
                status = int(buffer[9:12])
                del buffer[: end + 4 + length]
                return status
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise RuntimeError("the listener closed the connection")
        buffer += chunk


class Scraper(threading.Thread):
    """GETs ``url`` every ``interval`` seconds (0: back to back) over one keep-alive
    connection, a raw socket and a request prepared once (``http.client`` costs ~70 us of
    CPU a request, this ~10 us), until stopped or ``count`` scrapes; counts the scrapes and
    its own CPU time. ``url=None``: a ticker, the same wake-ups at the same pace with no
    request at all (what any process waking that often costs the machine, a control)."""

    def __init__(self, url: str | None, interval: float, count: int | None = None) -> None:
        super().__init__(daemon=True)
        self.address: tuple[str, int] | None = None
        self.request = b""
        if url is not None:
            parts = urlsplit(url)
            self.address = (parts.hostname or "127.0.0.1", parts.port or 80)
            self.request = f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode()
        self.interval = interval
        self.count = count
        self.scrapes = 0
        self.seconds = 0.0
        self.cpu = 0.0
        self.error: BaseException | None = None
        self._done = False

    def run(self) -> None:
        try:
            self._scrape()
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def _scrape(self) -> None:
        # a stand-in for a Prometheus on another host: its wake-ups should not preempt the
        # store and its clients on this one (SCHED_BATCH: this thread only)
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        sock = None
        if self.address is not None:
            sock = socket.create_connection(self.address, timeout=30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = bytearray()
        cpu = time.thread_time()
        start = time.perf_counter()
        next_at = start
        while not self._done and self.scrapes != self.count:
            if sock is not None:
                sock.sendall(self.request)
                status = read_reply(sock, buffer)
                if status != 200:
                    raise RuntimeError(f"scrape failed: {status}")
            self.scrapes += 1
            next_at += self.interval
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            else:
                next_at = time.perf_counter()  # behind: do not burst to catch up
        self.seconds = time.perf_counter() - start
        self.cpu = time.thread_time() - cpu
        if sock is not None:
            sock.close()

    def stop(self) -> dict[str, float]:
        self._done = True
        self.join(60)
        if self.error is not None:
            raise RuntimeError(f"scraper failed: {self.error!r}")
        return {
            "scrapes": self.scrapes,
            "scrapes_per_s": round(self.scrapes / max(self.seconds, 1e-9), 1),
            "scraper_cpu_us_per_scrape": round(self.cpu / max(self.scrapes, 1) * 1e6, 1),
        }


#: --metrics variants: name -> (server of :class:`MetricsServers`, seconds between scrapes
#: or None). A second server without metrics is a control: its ratio over the first shows
#: what the method resolves (an A/A test). The ticker is another: the scraper's wake-ups at
#: 1,000/s with nothing sent (a server without metrics): the cost to the store's clients of
#: any process waking that often on this machine, whatever it does when awake.
METRICS_VARIANTS: dict[str, tuple[str, float | None]] = {
    "no metrics": ("plain", None),
    "no metrics, 2nd server (A/A control)": ("control", None),
    "no metrics, a ticker wakes 1000/s (control)": ("plain", 0.001),
    "scraped every 100 ms": ("metrics", 0.1),
    "scraped 1000/s": ("metrics", 0.001),
}


def listener_pid(store_pid: int) -> int:
    """The listener process of ``rdzv serve --metrics-port`` (its one child)."""
    return int(Path(f"/proc/{store_pid}/task/{store_pid}/children").read_text().split()[0])


class MetricsServers:
    """``rdzv serve`` without metrics twice (``plain``, ``control``) and with
    ``--metrics-port 0`` (``metrics``), all running, one at a time resumed (:meth:`use`; the
    others stopped with SIGSTOP, a listener included, so idle publishing costs the phase
    nothing)."""

    NAMES = ("plain", "control", "metrics")

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.ports: list[int] = []
        try:
            for name in self.NAMES:
                extra = ("--metrics-port", "0") if name == "metrics" else ()
                self.procs[name], port = start_server("rdzv", extra)
                self.ports.append(port)
            self.url = metrics_url(self.procs["metrics"])
            self.listener = listener_pid(self.procs["metrics"].pid)
        except BaseException:
            self.close()
            raise
        self._stopped: list[int] = []

    def _pids(self, name: str) -> list[int]:
        pid = self.procs[name].pid
        return [pid, self.listener] if name == "metrics" else [pid]

    def use(self, *names: str) -> tuple[list[int], list[int]]:
        """Resume servers ``names``, stop the others: their indexes in :attr:`ports`, their
        pids."""
        self._signal(signal.SIGCONT, self._stopped)
        self._stopped = [
            pid for other in self.NAMES if other not in names for pid in self._pids(other)
        ]
        self._signal(signal.SIGSTOP, self._stopped)
        return [self.NAMES.index(n) for n in names], [self.procs[n].pid for n in names]

    @staticmethod
    def _signal(sig: int, pids: list[int]) -> None:
        for pid in pids:
            os.kill(pid, sig)

    def close(self) -> None:
        self._signal(signal.SIGCONT, getattr(self, "_stopped", []))
        self._stopped = []
        for proc in self.procs.values():
            stop_server(proc)


def metrics_phase(
    servers: MetricsServers, pool: Clients, variant: str, seconds: float
) -> dict[str, Any]:
    """One phase of ``variant``: the clients' loop on its server for ``seconds``, scraped
    at its interval for the whole phase."""
    server, interval = METRICS_VARIANTS[variant]
    [index], [pid] = servers.use(server)
    if interval is None:
        return pool.run(index, seconds, pid)
    scraping = server == "metrics"  # else a ticker: the wake-ups alone
    scraper = Scraper(servers.url if scraping else None, interval)
    listener = cpu_ns(servers.listener)
    scraper.start()
    result = pool.run(index, seconds, pid)
    scraped = scraper.stop()
    listener = cpu_ns(servers.listener) - listener  # over the clients' phase and the scrapes'
    ops = max(result["ops_per_s"] * seconds, 1)
    result.update(scraped)
    if scraping:
        result["listener_cpu_us_per_op"] = round(listener / 1e3 / ops, 3)
    result["scraper_cpu_us_per_op"] = round(
        scraped["scraper_cpu_us_per_scrape"] * scraped["scrapes"] / ops, 3
    )
    return result


#: --metrics paired variants: name -> (two servers of :class:`MetricsServers` serving half
#: the clients each at once, seconds between scrapes of the second). The same machine state
#: hits both: their throughput ratio is immune to other tenants (but not what a listener
#: and scraper cost the machine, which slows both: read their CPU per op for that).
PAIRED_VARIANTS: dict[str, tuple[tuple[str, str], float | None]] = {
    "paired: scraped every 100 ms / no metrics": (("plain", "metrics"), 0.1),
    "paired: A/A control": (("plain", "control"), None),
}


def paired_phase(
    servers: MetricsServers, pool: Clients, variant: str, seconds: float
) -> dict[str, float]:
    """One phase of a paired variant: the second server's throughput and server CPU per op
    over the first's."""
    names, interval = PAIRED_VARIANTS[variant]
    indexes, pids = servers.use(*names)
    scraper = None if interval is None else Scraper(servers.url, interval)
    if scraper is not None:
        scraper.start()
    result = pool.run_split(indexes, seconds, pids)
    if scraper is not None:
        scraper.stop()
    ops, cpu = result["ops_per_s"], result["server_cpu_us_per_op"]
    return {"ops_ratio": ops[1] / ops[0], "server_cpu_ratio": cpu[1] / cpu[0]}


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def spread(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """Median, quartiles, min and max of ``values``."""
    ordered = sorted(values)
    n = len(ordered)
    return {
        "median": round(median(ordered), digits),
        "q1": round(ordered[(n - 1) // 4], digits),
        "q3": round(ordered[(3 * (n - 1) + 3) // 4], digits),
        "min": round(ordered[0], digits),
        "max": round(ordered[-1], digits),
    }


def total_cpu_us_per_op(run: dict[str, Any]) -> float:
    """CPU per op of everything the benchmark runs: store, clients, listener, scraper."""
    return float(
        run["server_cpu_us_per_op"]
        + run["clients_cpu_us_per_op"]
        + run.get("listener_cpu_us_per_op", 0.0)
        + run.get("scraper_cpu_us_per_op", 0.0)
    )


def metrics_rows(clients: int, rows: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per variant: medians over its phases, and per-repeat ratios over no metrics: of
    throughput, of the store's CPU per op, and of the CPU per op of all the benchmark's
    processes (on a saturated machine, throughput is the CPU share the benchmark gets over
    that: the ratio tells the cost whatever share other tenants leave it)."""
    base = rows["no metrics"]
    out = []
    for variant, runs in rows.items():
        row: dict[str, Any] = {"variant": variant, "clients": clients, "phases": len(runs)}
        for r in runs:
            r["total_cpu_us_per_op"] = total_cpu_us_per_op(r)
        for field in (
            "ops_per_s",
            "p50_us",
            "p99_us",
            "server_cpu_us_per_op",
            "clients_cpu_us_per_op",
            "total_cpu_us_per_op",
            "machine_busy_cpus",
            "listener_cpu_us_per_op",
            "scraper_cpu_us_per_op",
            "scrapes_per_s",
            "scraper_cpu_us_per_scrape",
        ):
            if field in runs[0]:
                row[field] = round(median([r[field] for r in runs]), 3)
        if variant != "no metrics":
            for name, field in (
                ("ops_ratio", "ops_per_s"),
                ("server_cpu_ratio", "server_cpu_us_per_op"),
                ("total_cpu_ratio", "total_cpu_us_per_op"),
            ):
                row[name] = spread([r[field] / b[field] for r, b in zip(runs, base, strict=True)])
        row["ops_per_s_phases"] = [r["ops_per_s"] for r in runs]
        out.append(row)
    return out


def scrape_cost(scrapes: int = 5000, idle: float = 3.0) -> dict[str, float]:
    """Without store load: the CPU one /metrics scrape costs the listener process, the
    scraper (:class:`Scraper`) and the store process, and the store process's CPU per
    second spent publishing snapshots to an idle listener (once the status document's
    first :data:`~rdzv.observe.channel.WATCH_TIMEOUT` seconds are over: snapshots only)."""
    sys.path.insert(0, str(SRC))
    from rdzv.observe.channel import WATCH_TIMEOUT

    started = time.monotonic()
    proc, _ = start_server("rdzv", ("--metrics-port", "0"))
    try:
        url = metrics_url(proc)
        listener = listener_pid(proc.pid)
        time.sleep(1.0)  # started
        scraper = Scraper(url, 0.0, scrapes)
        before = (cpu_ns(listener), cpu_ns(proc.pid))
        scraper.start()
        scraper.join(120)
        after = (cpu_ns(listener), cpu_ns(proc.pid))
        scraped = scraper.stop()
        time.sleep(max(0.0, started + WATCH_TIMEOUT + 1.0 - time.monotonic()))
        store_cpu = cpu_ns(proc.pid)
        time.sleep(idle)
        publishing = cpu_ns(proc.pid) - store_cpu
    finally:
        stop_server(proc)
    listener_ns, store_ns = (b - a for a, b in zip(before, after, strict=True))
    return {
        "scrapes": scrapes,
        "scrape_wall_us": round(scraper.seconds / scrapes * 1e6, 1),
        "listener_cpu_us_per_scrape": round(listener_ns / 1e3 / scrapes, 1),
        "scraper_cpu_us_per_scrape": scraped["scraper_cpu_us_per_scrape"],
        "store_cpu_us_per_scrape": round(store_ns / 1e3 / scrapes, 2),
        "store_cpu_ms_per_s_idle_publishing": round(publishing / 1e6 / idle, 2),
    }


def perf_shares(pid: int, seconds: float, during: Callable[[], object]) -> dict[str, Any]:
    """``perf record`` (software cpu-clock sampling, 4999 Hz) of process ``pid`` while
    ``during()`` runs: the share of samples (%) per shared object, and of the clock reads
    (``clock_gettime``: vDSO, libc and PLT entries) that time each read when counting."""
    import shutil
    import tempfile

    if shutil.which("perf") is None:
        raise SystemExit("--profile needs Linux perf on PATH (Debian: apt-get install linux-perf)")
    with tempfile.TemporaryDirectory(prefix="rdzv-perf-") as tmp:
        data = f"{tmp}/perf.data"
        perf = subprocess.Popen(
            ["perf", "record", "-q", "-e", "cpu-clock", "-F", "4999", "-p", str(pid),
             "-o", data, "--", "sleep", str(seconds + 0.3)],
        )  # fmt: skip
        during()
        perf.wait(60)
        report = subprocess.run(
            ["perf", "report", "-i", data, "--stdio", "--sort", "dso,sym"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    by_dso: dict[str, float] = {}
    clock = 0.0
    for line in report.splitlines():
        fields = line.split()
        if len(fields) < 4 or not fields[0].endswith("%") or line.startswith("#"):
            continue
        share = float(fields[0][:-1])
        dso = fields[1].split(".cpython")[0]
        by_dso[dso] = by_dso.get(dso, 0.0) + share
        if "clock_gettime" in fields[-1]:
            clock += share
    top = dict(sorted(by_dso.items(), key=lambda kv: -kv[1])[:6])
    return {"dso_pct": {k: round(v, 2) for k, v in top.items()}, "clock_reads_pct": round(clock, 2)}


def counting_profile(clients: int, seconds: float, procs: int) -> dict[str, Any]:
    """Where the store process spends its CPU with and without metrics (:func:`perf_shares`,
    one phase each, same clients): does the counting in C (two ``clock_gettime`` calls
    and a bucket search per read) show?"""
    servers = MetricsServers()
    try:
        with Clients("torch", servers.ports, clients, procs) as pool:
            out: dict[str, Any] = {"clients": clients, "seconds": seconds}
            for name, server in (("no metrics", "plain"), ("metrics", "metrics")):
                [index], [pid] = servers.use(server)
                result: dict[str, Any] = {}

                def run(
                    index: int = index, pid: int = pid, result: dict[str, Any] = result
                ) -> None:
                    result.update(pool.run(index, seconds, pid))

                out[name] = perf_shares(pid, seconds, run)
                out[name]["server_cpu_us_per_op"] = result["server_cpu_us_per_op"]
    finally:
        servers.close()
    return out


def metrics_main(args: argparse.Namespace) -> None:
    variants = list(METRICS_VARIANTS)
    results = []
    loads = [os.getloadavg()[0]]
    for clients in args.clients:
        servers = MetricsServers()
        try:
            with Clients("torch", servers.ports, clients, args.procs) as pool:
                for variant in variants:  # warm-up, not recorded
                    metrics_phase(servers, pool, variant, min(args.seconds, 0.5))
                paired = list(PAIRED_VARIANTS) if clients >= 2 else []
                rows: dict[str, list[dict[str, Any]]] = {v: [] for v in variants + paired}
                schedule = variants + paired
                for repeat in range(args.repeats):
                    turn = repeat % len(schedule)
                    for variant in schedule[turn:] + schedule[:turn]:
                        if variant in PAIRED_VARIANTS:
                            rows[variant].append(paired_phase(servers, pool, variant, args.seconds))
                        else:
                            rows[variant].append(
                                metrics_phase(servers, pool, variant, args.seconds)
                            )
                        loads.append(os.getloadavg()[0])
        finally:
            servers.close()
        single = {v: rows[v] for v in variants}
        for row in metrics_rows(clients, single) + [
            {
                "variant": variant,
                "clients": clients,
                "phases": len(rows[variant]),
                **{
                    k: spread([r[k] for r in rows[variant]])
                    for k in ("ops_ratio", "server_cpu_ratio")
                },
            }
            for variant in paired
        ]:
            results.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(
        json.dumps(
            {
                "figure": "rdzv serve --metrics-port: cost of metrics, torch C++ clients",
                "workload": {
                    "loop": "set(key, 64 B) then get(key) (torch get = WAIT + GET)",
                    "keys_per_client": KEYS_PER_CLIENT,
                    "phase_seconds": args.seconds,
                    "repeats": args.repeats,
                    "op": "one set or get call",
                    "scraper": "one thread of the bench process, raw socket, keep-alive",
                    "schedule": "variants in turn within each repeat, order rotated; same "
                    "client connections; the idle servers SIGSTOPped",
                    "statistic": "median over phases; ratios per repeat over no metrics "
                    "(median, quartiles, min, max); CPU from /proc/*/task/*/schedstat",
                },
                "machine": {**machine(), "load_average_1min": spread(loads, 2)},
                "results": results,
                "scrape_cost_without_load": scrape_cost(),
                **(
                    {"counting_profile": counting_profile(16, 3.0, args.procs)}
                    if args.profile
                    else {}
                ),
            },
            indent=2,
        )
    )


def stop_server(proc: subprocess.Popen[str]) -> None:
    # torch's server script exits when its stdin closes; rdzv serve on SIGTERM.
    proc.terminate()
    proc.communicate(timeout=30)


# --------------------------------------------------------------------------- client worker
def worker(client: str, ports: list[int], threads: int, first: int) -> None:
    """Client process: connects ``threads`` clients to each of ``ports``, prints ``ready``,
    then runs one phase per line read from stdin (``INDEX[,INDEX...] START SECONDS``: the
    clients of ``ports[INDEX]`` loop from ``time.time() == START`` for ``SECONDS``; with
    several indexes, client ``first + t`` of the run uses the ``(first + t) % k``-th) and
    prints a JSON summary line per phase; exits at the end of stdin."""
    if client == "torch":
        import datetime

        import torch.distributed as dist

        def connect(port: int) -> Any:
            return dist.TCPStore("127.0.0.1", port, timeout=datetime.timedelta(seconds=60))
    else:
        sys.path.insert(0, str(SRC))
        from rdzv.store.tcp import TCPStore

        def connect(port: int) -> Any:
            return TCPStore("127.0.0.1", port, timeout=60, **security_kwargs())

    stores = [[connect(port) for _ in range(threads)] for port in ports]
    print("ready", flush=True)
    for line in sys.stdin:
        spec, start_at, seconds = line.split()
        indexes = [int(i) for i in spec.split(",")]
        groups = [(first + t) % len(indexes) for t in range(threads)]
        chosen = [stores[indexes[g]][t] for t, g in enumerate(groups)]
        report = phase(chosen, float(start_at), float(seconds))
        report["ops_by_group"] = [
            sum(n for n, g in zip(report["counts"], groups, strict=True) if g == k)
            for k in range(len(indexes))
        ]
        print(json.dumps(report), flush=True)


def phase(stores: list[Any], start_at: float, seconds: float) -> dict[str, Any]:
    """One thread per store loops from ``time.time() == start_at`` for ``seconds``: ops done
    and sampled latencies (seconds)."""
    counts = [0] * len(stores)
    samples: list[list[float]] = [[] for _ in stores]
    errors: list[str] = []
    pid = os.getpid()
    cpu = time.process_time()  # this process's, its threads' included (even once ended)

    def run(t: int) -> None:
        store = stores[t]
        keys = [f"bench/{pid}/{t}/{i}" for i in range(KEYS_PER_CLIENT)]
        lat = samples[t]
        clock = time.perf_counter
        n = 0
        while time.time() < start_at:
            time.sleep(0.001)
        end = clock() + seconds
        while True:
            key = keys[n % KEYS_PER_CLIENT]
            t0 = clock()
            store.set(key, VALUE)
            t1 = clock()
            store.get(key)
            t2 = clock()
            n += 2
            if n % SAMPLE_EVERY < 2:
                lat.append(t1 - t0)
                lat.append(t2 - t1)
            if t2 >= end:
                break
        counts[t] = n

    def guarded(t: int) -> None:
        try:
            run(t)
        except Exception as exc:  # reported with the phase: the bench names it and stops
            errors.append(f"client {t} of process {pid}: {type(exc).__name__}: {exc}")

    pool = [threading.Thread(target=guarded, args=(t,)) for t in range(len(stores))]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    return {
        "ops": sum(counts),
        "counts": counts,
        "cpu": time.process_time() - cpu,
        "latencies": [x for s in samples for x in s],
        "errors": errors,
    }


class Clients:
    """``clients`` client connections to each of ``ports``, in at most ``procs`` client
    processes (:func:`worker`), all connected before the first phase; :meth:`run` runs one
    phase of the set/get loop against one port."""

    def __init__(self, client: str, ports: Sequence[int], clients: int, procs: int) -> None:
        nproc = max(1, min(procs, clients))
        split = [clients // nproc + (1 if i < clients % nproc else 0) for i in range(nproc)]
        self.procs = nproc
        ports_arg = ",".join(map(str, ports))
        self.workers = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    client,
                    ports_arg,
                    str(n),
                    str(sum(split[:i])),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=_env(),
            )
            for i, n in enumerate(split)
        ]
        for w in self.workers:  # every client connected
            assert w.stdout is not None
            if w.stdout.readline() != "ready\n":
                self.close()
                raise RuntimeError("a client process failed to connect")

    def __enter__(self) -> Clients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _phase(
        self, indexes: Sequence[int], seconds: float, pids: Sequence[int]
    ) -> tuple[list[dict[str, Any]], list[int], float]:
        """One phase of every client on its port among ``indexes``: the workers' reports, the
        CPU nanoseconds of each of ``pids`` and the machine's busy CPU seconds over it."""
        start_at = time.time() + 0.2
        for w in self.workers:
            assert w.stdin is not None
            w.stdin.write(f"{','.join(map(str, indexes))} {start_at} {seconds}\n")
            w.stdin.flush()
        time.sleep(max(0.0, start_at - time.time()))
        cpu_before = [cpu_ns(pid) for pid in pids]
        busy_before = machine_busy_seconds()
        time.sleep(seconds)
        busy = machine_busy_seconds() - busy_before
        cpu_used = [cpu_ns(pid) - b for pid, b in zip(pids, cpu_before, strict=True)]
        reports = []
        for w in self.workers:
            assert w.stdout is not None
            line = w.stdout.readline()
            if not line:
                raise RuntimeError(f"client process failed ({w.wait()})")
            reports.append(json.loads(line))
        errors = [e for r in reports for e in r["errors"]]
        if errors:  # a failed client would skew the figures: stop and say which and why
            raise RuntimeError(
                f"{len(errors)} client(s) failed in a phase on server(s) {list(pids)}: "
                + "; ".join(errors[:5])
            )
        return reports, cpu_used, busy

    def run_split(
        self, indexes: Sequence[int], seconds: float, pids: Sequence[int]
    ) -> dict[str, list[float]]:
        """One phase with the clients split over ``ports[i]`` for ``i`` in ``indexes`` (the
        servers' pids ``pids``), all at once: ops/s and server CPU per op of each."""
        reports, cpu_used, _ = self._phase(indexes, seconds, pids)
        ops = [sum(r["ops_by_group"][k] for r in reports) for k in range(len(indexes))]
        return {
            "ops_per_s": [n / seconds for n in ops],
            "server_cpu_us_per_op": [
                c / 1e3 / max(n, 1) for c, n in zip(cpu_used, ops, strict=True)
            ],
        }

    def run(self, index: int, seconds: float, server_pid: int) -> dict[str, Any]:
        """One phase on ``ports[index]``: ops/s, p50 and p99 latency per call, and the CPU
        per op of ``server_pid`` (over the phase's ``seconds``)."""
        reports, [cpu_used], busy = self._phase([index], seconds, [server_pid])
        ops = sum(r["ops"] for r in reports)
        client_cpu = sum(r["cpu"] for r in reports)
        latencies = sorted(x for r in reports for x in r["latencies"])

        def pct(p: float) -> float:
            return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1e6, 1)

        return {
            "ops_per_s": round(ops / seconds),
            "p50_us": pct(0.50),
            "p99_us": pct(0.99),
            "server_cpu_us_per_op": round(cpu_used / 1e3 / max(ops, 1), 3),
            "clients_cpu_us_per_op": round(client_cpu * 1e6 / max(ops, 1), 3),
            "machine_busy_cpus": round(busy / seconds, 2),
            "client_processes": self.procs,
        }

    def close(self) -> None:
        for w in self.workers:
            assert w.stdin is not None
            w.stdin.close()
        for w in self.workers:
            try:
                w.wait(60)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine spent busy so far (not idle nor waiting for I/O;
    /proc/stat, clock ticks)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def run_clients(
    client: str, port: int, clients: int, procs: int, seconds: float, server_pid: int
) -> dict[str, Any]:
    """One phase of ``clients`` fresh clients on ``port`` (:class:`Clients`)."""
    with Clients(client, [port], clients, procs) as pool:
        return pool.run(0, seconds, server_pid)


def measure(server: str, client: str, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    proc, port = start_server(server)
    try:
        return run_clients(client, port, clients, args.procs, args.seconds, proc.pid)
    finally:
        stop_server(proc)


def alternated(
    variants: Sequence[str], repeats: int, run: Callable[[str], dict[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    """``run(variant)`` ``repeats`` times for each of ``variants``, alternating variants (the
    machine's load drifts); the runs by variant."""
    rows: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for _ in range(repeats):
        for variant in variants:
            rows[variant].append(run(variant))
    return rows


def summarize(server: str, client: str, clients: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median run (by ops/s) of several, with every run's ops/s for reference."""
    ordered = sorted(runs, key=lambda r: r["ops_per_s"])
    median = ordered[len(ordered) // 2]
    return {
        "server": server,
        "client": client,
        "clients": clients,
        **median,
        "ops_per_s_runs": [r["ops_per_s"] for r in runs],
    }


# --------------------------------------------------------------------------- durability
DURABILITY_MODES = ("memory", "never", "interval", "always")


def measure_durable(mode: str, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    """rdzv's Python client on ``rdzv serve`` in memory or with ``--data-dir --fsync mode``
    (a fresh directory next to the repository's other temporary files)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="rdzv-bench-") as data_dir:
        extra = () if mode == "memory" else ("--data-dir", data_dir, "--fsync", mode)
        proc, port = start_server("rdzv", extra)
        try:
            result = run_clients("rdzv", port, clients, args.procs, args.seconds, proc.pid)
        finally:
            stop_server(proc)
    return {"durability": mode, **result}


def durability_main(args: argparse.Namespace) -> None:
    results = []
    for clients in args.durability_clients:
        rows = alternated(
            DURABILITY_MODES, args.repeats, lambda m, n=clients: measure_durable(m, n, args)
        )
        for mode in DURABILITY_MODES:
            results.append({"durability": mode, **summarize("rdzv", "rdzv", clients, rows[mode])})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(
        json.dumps(
            {
                "figure": "rdzv serve --data-dir: cost of durability per fsync policy",
                "workload": {
                    "loop": "set(key, 64 B) then get(key), rdzv Python client (extensions)",
                    "keys_per_client": KEYS_PER_CLIENT,
                    "seconds": args.seconds,
                    "op": "one set or get call",
                    "repeats": args.repeats,
                    "statistic": "median run by ops/s; latencies and CPU of that run",
                    "data_dir": "tempfile.gettempdir(): " + __import__("tempfile").gettempdir(),
                },
                "machine": machine(),
                "results": results,
            },
            indent=2,
        )
    )


def machine() -> dict[str, Any]:
    import torch

    try:
        import uvloop

        uv = uvloop.__version__
    except ImportError:
        uv = None
    return {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "uvloop": uv,
        "rdzv_fastpath": fastpath_state(),
    }


def fastpath_state() -> str:
    """Whether ``rdzv serve`` runs its C fast path here (the extension built, not disabled)."""
    sys.path.insert(0, str(SRC))
    from rdzv.server import fastpath

    if not fastpath.AVAILABLE:
        return "not built"
    return "on" if fastpath.ENABLED else "off (RDZV_FASTPATH=0)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--procs", type=int, default=4, help="client processes (at most)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (median)")
    parser.add_argument(
        "--python-clients", type=int, nargs="*", default=[1, 16],
        help="client counts for rdzv's Python client on rdzv's server",
    )  # fmt: skip
    parser.add_argument(
        "--security", action="store_true", help="measure auth and TLS costs (with --durability too)"
    )
    parser.add_argument(
        "--durability", action="store_true",
        help="measure rdzv serve --data-dir (fsync always/interval/never) vs in memory",
    )  # fmt: skip
    parser.add_argument("--durability-clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument(
        "--metrics", action="store_true",
        help="measure rdzv serve with --metrics-port (scraped every 100 ms, and 1000/s) vs without",
    )  # fmt: skip
    parser.add_argument(
        "--profile", action="store_true",
        help="with --metrics: also profile the store process with perf (metrics on and off)",
    )  # fmt: skip
    parser.add_argument(
        "--variants", action="store_true",
        help="also measure rdzv serve without busy polling (--busy-poll-us 0) and with its "
        "C fast path off (RDZV_FASTPATH=0, which also turns busy polling off)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.metrics:
        metrics_main(args)
        return
    if args.durability or args.security:
        # Either or both in one run (both: durability's JSON document, then security's).
        if args.durability:
            durability_main(args)
        if args.security:
            security_main(args)
        return
    results = []
    plan = [("torch", "torch"), ("rdzv", "torch")]
    if args.variants:
        plan += [("rdzv-nopoll", "torch"), ("rdzv-python", "torch")]
    for clients in args.clients:
        rows: dict[str, list[dict[str, Any]]] = {server: [] for server, _ in plan}
        for _ in range(args.repeats):  # alternate servers: the machine's load drifts
            for server, client in plan:
                rows[server].append(measure(server, client, clients, args))
        for server, client in plan:
            results.append(summarize(server, client, clients, rows[server]))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    for clients in args.python_clients:
        runs = [measure("rdzv", "rdzv", clients, args) for _ in range(args.repeats)]
        results.append(summarize("rdzv", "rdzv", clients, runs))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)

    def ops(server: str, clients: int) -> int:
        return next(
            r["ops_per_s"]
            for r in results
            if r["server"] == server and r["client"] == "torch" and r["clients"] == clients
        )

    ratios = {str(n): round(ops("rdzv", n) / ops("torch", n), 3) for n in args.clients}
    print(
        json.dumps(
            {
                "figure": "TCPStore server throughput and latency, torch C++ clients",
                "workload": {
                    "loop": "set(key, 64 B) then get(key) (torch get = WAIT + GET)",
                    "keys_per_client": KEYS_PER_CLIENT,
                    "seconds": args.seconds,
                    "op": "one set or get call",
                    "repeats": args.repeats,
                    "statistic": "median run by ops/s; latencies and CPU of that run",
                },
                "machine": machine(),
                "results": results,
                "ratio_rdzv_over_torch": ratios,
            },
            indent=2,
        )
    )


# --------------------------------------------------------------------------- security costs
# The token travels in $RDZV_TOKEN (read by `rdzv serve` and by the client); the TLS CA in
# $BENCH_TLS_CA (read by the client worker).
SECURITY_VARIANTS = ("plain", "token", "tls", "token+tls")
CONNECTS = 200


def security_kwargs() -> dict[str, Any]:
    """TCPStore keyword arguments of the current security variant (client side)."""
    ca = os.environ.get("BENCH_TLS_CA")
    if not ca:
        return {}
    from rdzv.tls import TLSConfig

    return {"tls": TLSConfig(ca=ca)}


def _security_setup(variant: str, certs: Any) -> list[str]:
    """Set the environment of ``variant``; return the extra ``rdzv serve`` arguments."""
    os.environ.pop("RDZV_TOKEN", None)
    os.environ.pop("BENCH_TLS_CA", None)
    extra: list[str] = []
    if "token" in variant:
        os.environ["RDZV_TOKEN"] = "bench-" + "0123456789abcdef" * 2
    if "tls" in variant:
        os.environ["BENCH_TLS_CA"] = str(certs.ca)
        extra = ["--tls-cert", str(certs.server.cert), "--tls-key", str(certs.server.key)]
    return extra


def _connect_times(port: int) -> dict[str, float]:
    from rdzv.store.tcp import TCPStore

    times = []
    for _ in range(CONNECTS):
        t0 = time.perf_counter()
        TCPStore("127.0.0.1", port, timeout=60, **security_kwargs()).close()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "connect_p50_us": round(times[len(times) // 2] * 1e6, 1),
        "connect_p99_us": round(times[int(0.99 * len(times))] * 1e6, 1),
    }


def security_main(args: argparse.Namespace) -> None:
    import tempfile

    sys.path[:0] = [str(SRC), str(REPO)]
    from tests.security.certs import make_certs

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        certs = make_certs(Path(tmp))
        for clients in args.python_clients:
            rows: dict[str, list[dict[str, Any]]] = {v: [] for v in SECURITY_VARIANTS}
            for _ in range(args.repeats):  # alternate variants: the machine's load drifts
                for variant in SECURITY_VARIANTS:
                    proc, port = start_server("rdzv", _security_setup(variant, certs))
                    try:
                        run = run_clients("rdzv", port, clients, args.procs, args.seconds, proc.pid)
                        run.update(_connect_times(port))
                    finally:
                        stop_server(proc)
                    rows[variant].append(run)
            for variant in SECURITY_VARIANTS:
                row = {"variant": variant, **summarize("rdzv", "rdzv", clients, rows[variant])}
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    _security_setup("plain", None)
    print(
        json.dumps(
            {
                "figure": "Security costs: rdzv Python client on rdzv serve, auth and TLS",
                "workload": {
                    "loop": "set(key, 64 B) then get(key) (one round trip each)",
                    "connect": f"{CONNECTS} sequential TCPStore() + close() (handshake incl.)",
                    "keys_per_client": KEYS_PER_CLIENT,
                    "seconds": args.seconds,
                    "repeats": args.repeats,
                    "statistic": "median run by ops/s; latencies and CPU of that run",
                },
                "machine": machine(),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, client, ports, threads, first = sys.argv
        worker(client, [int(p) for p in ports.split(",")], int(threads), int(first))
    else:
        main()
