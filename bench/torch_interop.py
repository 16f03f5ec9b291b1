"""Cost of the torch store adapter: rdzv's TCPStore server reached four ways.

Prints one JSON document with operations per second of ``set``, ``get`` and ``add`` (one
thread, one connection, 32-byte values, median of a few measurements) for:

* ``rdzv TCPStore``: rdzv's client, called from Python;
* ``TorchStore(rdzv TCPStore)``: the ``torch.distributed.Store`` adapter, called from Python
  (what torchelastic's agent does with the round store);
* ``torch PrefixStore(TorchStore)``: torch's C++ PrefixStore calling back into the adapter
  through torch's Python-store trampoline (what a process group does with it);
* ``torch TCPStore``: torch's own C++ client talking to rdzv's server (what torch workers use
  with ``TORCHELASTIC_USE_AGENT_STORE``).

Usage (from the repository root; about 15 s)::

    python bench/torch_interop.py [--seconds 0.3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import rdzv  # noqa: E402
from rdzv.interop.torch import TorchStore  # noqa: E402

KEYS = 1000
VALUE = b"v" * 32


def measure(fn: Callable[[int], object], seconds: float) -> float:
    """Operations per second of ``fn(i)``, called in batches until ``seconds`` have passed."""
    done = 0
    start = time.perf_counter()
    while True:
        for i in range(done, done + 100):
            fn(i)
        done += 100
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def bench(store: Any, seconds: float, repeats: int) -> dict[str, float]:
    keys = [f"key/{i}" for i in range(KEYS)]
    for key in keys:
        store.set(key, VALUE)
    ops: dict[str, Callable[[int], object]] = {
        "set": lambda i: store.set(keys[i % KEYS], VALUE),
        "get": lambda i: store.get(keys[i % KEYS]),
        "add": lambda i: store.add("counter", 1),
    }
    return {
        name: round(statistics.median(measure(fn, seconds) for _ in range(repeats)))
        for name, fn in ops.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=0.3, help="length of one measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per figure (median)")
    args = parser.parse_args()

    server = rdzv.TCPStore("127.0.0.1", 0, None, True, 30, wait_for_workers=False)
    port = server.port

    def client() -> rdzv.TCPStore:
        return rdzv.TCPStore("127.0.0.1", port, None, False, 30)

    adapter = TorchStore(client())
    prefixed_adapter = TorchStore(client())
    factories: dict[str, Callable[[], Any]] = {
        "rdzv TCPStore": client,
        "TorchStore(rdzv TCPStore)": lambda: adapter,
        "torch PrefixStore(TorchStore)": lambda: dist.PrefixStore("p", prefixed_adapter),
        "torch TCPStore": lambda: dist.TCPStore(
            "127.0.0.1", port, None, False, timedelta(seconds=30)
        ),
    }
    results = {name: bench(make(), args.seconds, args.repeats) for name, make in factories.items()}
    print(
        json.dumps(
            {
                "figure": "operations per second against rdzv's TCPStore server (127.0.0.1)",
                "workload": {
                    "keys": KEYS,
                    "value_bytes": len(VALUE),
                    "seconds_per_measurement": args.seconds,
                    "repeats": args.repeats,
                    "threads": 1,
                },
                "results": results,
                "machine": {
                    "cpus": os.cpu_count(),
                    "machine": platform.machine(),
                    "system": f"{platform.system()} {platform.release()}",
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
