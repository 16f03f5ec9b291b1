"""Recovery time of a durable store directory against its size and content.

For each log size, builds a data directory in a temporary directory and times
:func:`rdzv.server.persistence.recover` (median of ``--repeats``) on three logs:

* ``small records``: commits of 16 sets of 64-byte values (the common case);
* ``torn hostile``: one value of the whole size whose bytes look like record and commit
  headers everywhere (fake commit headers every 41 bytes, fake record headers claiming to
  run to the end), its commit cut in half (the crash case of issue 16: 137 s for 8 MB before
  commits were framed);
* ``damaged hostile``: the same value, intact, after a commit whose header is damaged (the
  resync searches the rest of the file; recovery refuses with a report).

Prints one JSON document: seconds and MB/s per size and log kind, plus the machine.

Usage (from the repository root, about 20 s)::

    python bench/recovery.py [--sizes-mb 8 16 32 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from rdzv.engine import Engine  # noqa: E402
from rdzv.errors import StoreError  # noqa: E402
from rdzv.server import persistence  # noqa: E402
from rdzv.server.persistence import DurableJournal, recover  # noqa: E402


def hostile_value(size: int) -> bytes:
    fake_commit = b"\x00\x00\x00\x00" + persistence._COMMIT_NEEDLE + bytes(20)
    unit = fake_commit + b"\x00\x00\x00\x00" + (size - 64).to_bytes(4, "little") + b"\x01"
    return (unit * (size // len(unit) + 1))[:size]


def build(data_dir: Path, kind: str, size: int) -> int:
    engine = Engine()
    journal = DurableJournal(data_dir, fsync="never", snapshot_bytes=1 << 40)
    journal.open(engine)
    if kind == "small records":
        written, i = 0, 0
        while written < size:
            for _ in range(16):
                engine.set(b"key/%d" % i, b"v" * 64)
                i += 1
            written += journal.pending_bytes
            journal.commit()
    else:
        engine.set(b"a", b"1")
        journal.commit()
        engine.set(b"big", hostile_value(size))
        journal.commit()
    journal.close()
    log = data_dir / "log-0000000000.rdzv"
    data = bytearray(log.read_bytes())
    if kind == "torn hostile":
        del data[len(data) - size // 2 :]
    elif kind == "damaged hostile":
        data[10] ^= 1  # the first commit's header
    log.write_bytes(bytes(data))
    return len(data)


def time_recovery(kind: str, size: int, repeats: int) -> dict[str, Any]:
    runs = []
    length = 0
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            length = build(Path(tmp), kind, size)
            start = time.perf_counter()
            try:
                recover(tmp, Engine())
            except StoreError:
                assert kind == "damaged hostile"
            runs.append(time.perf_counter() - start)
    seconds = statistics.median(runs)
    return {
        "log": kind,
        "log_bytes": length,
        "seconds": round(seconds, 4),
        "mb_per_s": round(length / seconds / 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = [
        time_recovery(kind, mb * 1024 * 1024, args.repeats)
        for mb in args.sizes_mb
        for kind in ("small records", "torn hostile", "damaged hostile")
    ]
    print(
        json.dumps(
            {
                "workload": "recover() of one log generation, median of "
                f"{args.repeats} (the files are in the page cache)",
                "results": results,
                "machine": {
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                },
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
