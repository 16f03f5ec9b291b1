"""Local stores benchmark: rdzv HashStore/FileStore next to torch's, measured in one run.

Prints one JSON document: operations per second of ``set``, ``get``, ``add`` and an
alternating set/get mix for each store (one thread, one handle; median of a few
measurements), the time a new FileStore handle needs to replay a file of many keys, the
aggregate ``add`` rate of several processes on one FileStore counter, and the CPU seconds used
by a process blocked in ``FileStore.wait`` on a key that never comes (rdzv polls with
back-off; torch every 10 ms). The default run takes about 40 s.

Usage (from the repository root)::

    python bench/store_local.py [--seconds 0.5] [--repeats 3] [--dir /tmp]
        [--replay-keys 100000] [--procs 2] [--adds 5000] [--wait-seconds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import rdzv  # noqa: E402
from rdzv import FileStore, HashStore  # noqa: E402

KEYS = 1000
VALUE = b"v" * 32


def measure(fn: Callable[[int], None], seconds: float) -> float:
    """Operations per second of ``fn(i)``, called in batches until ``seconds`` have passed."""
    batch = 200
    done = 0
    start = time.perf_counter()
    while True:
        for i in range(done, done + batch):
            fn(i)
        done += batch
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def workloads(store: Any) -> dict[str, Callable[[int], None]]:
    keys = [f"key/{i}" for i in range(KEYS)]
    for k in keys:  # every key exists before the timed get/mix loops
        store.set(k, VALUE)

    def mix(i: int) -> None:
        if i & 1:
            store.get(keys[i % KEYS])
        else:
            store.set(keys[i % KEYS], VALUE)

    return {
        "set": lambda i: store.set(keys[i % KEYS], VALUE),
        "get": lambda i: store.get(keys[i % KEYS]),
        "add": lambda i: store.add("counter", 1),
        "set_get_mix": mix,
    }


def bench_stores(directory: str, seconds: float, repeats: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir=directory, prefix="rdzv-bench-") as tmp:
        factories: dict[str, Callable[[], Any]] = {
            "rdzv.HashStore": lambda: HashStore(),
            "torch.HashStore": lambda: dist.HashStore(),
            "rdzv.FileStore": lambda: FileStore(os.path.join(tmp, "rdzv.store")),
            "torch.FileStore": lambda: dist.FileStore(os.path.join(tmp, "torch.store"), -1),
        }
        for name, factory in factories.items():
            store = factory()
            results[name] = {
                op: round(statistics.median(measure(fn, seconds) for _ in range(repeats)))
                for op, fn in workloads(store).items()
            }
            if isinstance(store, FileStore):
                store.close()
            del store
    return results


def bench_replay(directory: str, n: int) -> dict[str, float]:
    """Seconds for a new handle to open a file holding ``n`` keys (replaying the log)."""
    keys = [f"key/{i}" for i in range(n)]
    values = [VALUE] * n
    out: dict[str, float] = {"keys": n}
    with tempfile.TemporaryDirectory(dir=directory, prefix="rdzv-bench-") as tmp:
        path = os.path.join(tmp, "store")
        writer = FileStore(path)
        writer.multi_set(keys, values)
        start = time.perf_counter()
        reader = FileStore(path)
        assert reader.num_keys() == n
        out["rdzv_s"] = round(time.perf_counter() - start, 4)
        reader.close()
        start = time.perf_counter()
        torch_reader = dist.FileStore(path, -1)
        assert torch_reader.num_keys() >= n  # torch counts its internal keys too
        out["torch_s"] = round(time.perf_counter() - start, 4)
        del torch_reader
        writer.close()
    return out


_ADD_SCRIPT = """
import json, sys, time
kind, path, parties, times = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if kind == "rdzv":
    from rdzv import FileStore
    store = FileStore(path, timeout=60)
else:
    from datetime import timedelta
    import torch.distributed as dist
    store = dist.FileStore(path, -1)
    store.set_timeout(timedelta(seconds=60))
store.add("arrived", 1)
while int(store.get("arrived")) < parties:  # start together (both stores: same keys)
    time.sleep(0.001)
start = time.time()
for _ in range(times):
    store.add("counter", 1)
print(json.dumps({"start": start, "end": time.time()}))
"""


def bench_contended_add(directory: str, parties: int, times: int) -> dict[str, Any]:
    """Aggregate add/s of ``parties`` processes hammering one counter in one file."""
    out: dict[str, Any] = {"processes": parties, "adds_per_process": times}
    with tempfile.TemporaryDirectory(dir=directory, prefix="rdzv-bench-") as tmp:
        for kind in ("rdzv", "torch"):
            path = os.path.join(tmp, f"{kind}.store")
            procs = [
                subprocess.Popen(
                    [sys.executable, "-c", _ADD_SCRIPT, kind, path, str(parties), str(times)],
                    env=_env(),
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for _ in range(parties)
            ]
            spans = [
                json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs
            ]
            wall = max(s["end"] for s in spans) - min(s["start"] for s in spans)
            out[f"{kind}_adds_per_second"] = round(parties * times / wall)
    return out


def _env() -> dict[str, str]:
    paths = [str(REPO / "src"), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


_WAIT_SCRIPT = """
import json, resource, sys, time
from datetime import timedelta
kind, path, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
if kind == "rdzv":
    from rdzv import FileStore, StoreTimeoutError as Timeout
    store = FileStore(path)
    wait = lambda: store.wait(["never"], seconds)
else:
    import torch.distributed as dist
    Timeout = RuntimeError
    store = dist.FileStore(path, -1)
    wait = lambda: store.wait(["never"], timedelta(seconds=seconds))
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
cpu0, wall0 = cpu(), time.monotonic()
try:
    wait()
except Timeout:
    pass
print(json.dumps({"wall_s": round(time.monotonic() - wall0, 3),
                  "cpu_s": round(cpu() - cpu0, 4)}))
"""


def bench_blocked_wait(directory: str, seconds: float) -> dict[str, Any]:
    """CPU used by a fresh process blocked ``seconds`` in FileStore.wait (rdzv vs torch)."""
    out: dict[str, Any] = {"requested_timeout_s": seconds}
    with tempfile.TemporaryDirectory(dir=directory, prefix="rdzv-bench-") as tmp:
        for kind in ("rdzv", "torch"):
            path = os.path.join(tmp, f"{kind}.store")
            proc = subprocess.run(
                [sys.executable, "-c", _WAIT_SCRIPT, kind, path, str(seconds)],
                env=_env(),
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            )
            out[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def filesystem_of(directory: str) -> str:
    """The filesystem type holding ``directory`` (from /proc/mounts; "unknown" elsewhere)."""
    best, kind = "", "unknown"
    real = os.path.realpath(directory)
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                point = fields[1]
                if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) > len(
                    best
                ):
                    best, kind = point, fields[2]
    except OSError:
        pass
    return kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per figure (median)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the store files go")
    parser.add_argument("--replay-keys", type=int, default=100_000)
    parser.add_argument("--wait-seconds", type=float, default=2.0)
    parser.add_argument("--procs", type=int, default=2, help="processes in the contended add")
    parser.add_argument("--adds", type=int, default=5000, help="adds per contending process")
    args = parser.parse_args()
    started = time.perf_counter()
    report = {
        "benchmark": "store_local",
        "command": " ".join(["python", "bench/store_local.py", *sys.argv[1:]]),
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "machine": platform.machine(),
            "torch": torch.__version__,
            "rdzv": rdzv.__version__,
            "store_dir": args.dir,
            "store_dir_filesystem": filesystem_of(args.dir),
        },
        "workload": {
            "threads": 1,
            "keys": KEYS,
            "value_bytes": len(VALUE),
            "seconds_per_measurement": args.seconds,
            "figure": f"median of {args.repeats} measurements",
            "ops": {
                "set": "set(key/i % 1000, 32 B)",
                "get": "get(key/i % 1000) of a present key",
                "add": "add('counter', 1)",
                "set_get_mix": "alternating set and get over the same keys",
            },
        },
        "ops_per_second": bench_stores(args.dir, args.seconds, args.repeats),
        "file_open_replay": bench_replay(args.dir, args.replay_keys),
        "file_contended_add": bench_contended_add(args.dir, args.procs, args.adds),
        "blocked_wait_cpu": bench_blocked_wait(args.dir, args.wait_seconds),
    }
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
