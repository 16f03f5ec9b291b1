"""A writer process for the crash test: ``python -m tests.durability.writer_proc PORT ID N``.

Sets ``w<ID>/<j>`` = ``<j>`` for j in 0..N-1 (every 5th batch as one multi_set), and after
every batch of 10 a ``check`` whose reply acknowledges the batch: prints ``acked <j>`` (all
writes up to j are acknowledged). Reconnects through a server restart (reconnect=True) and
prints ``done`` at the end.
"""

from __future__ import annotations

import sys
import time

from rdzv.store.tcp import TCPStore

BATCH = 10


def main() -> None:
    port, ident, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    store = TCPStore("127.0.0.1", port, timeout=60)
    for start in range(0, count, BATCH):
        keys = [f"w{ident}/{j}" for j in range(start, min(start + BATCH, count))]
        if (start // BATCH) % 5 == 0:
            store.multi_set(keys, [k.rsplit("/", 1)[1] for k in keys])
        else:
            for key in keys:
                store.set(key, key.rsplit("/", 1)[1])
        assert store.check(keys)
        print(f"acked {start + len(keys) - 1}", flush=True)
        time.sleep(0.002)  # pace the writers so that the kill lands in the middle
    store.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()
