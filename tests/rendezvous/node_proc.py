"""A rendezvous node in its own process, driven over stdin/stdout by the tests.

Usage: ``python -m tests.rendezvous.node_proc '<json config>'``. Commands on stdin, one per
line: ``join`` (next_rendezvous), ``waiting`` (num_nodes_waiting), ``closed`` (is_closed),
``exit``. Every answer and every rendezvous event is one JSON line on stdout; ``t`` fields
are the real ``time.monotonic()`` (system-wide on Linux, so comparable with the test's).

Config: ``store`` ({"kind": "file", "path"} or {"kind": "tcp", "host", "port"}), ``run_id``,
``min``, ``max``, ``interval``, ``attempts``, ``last_call``, ``join``, ``local_addr``, and
``skew`` ({"time": s, "monotonic": s}): offsets added to this process's wall clock
(time.time, datetime.now) and monotonic clock, to show that nothing compares clocks of
different machines.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
import threading
import time
from typing import Any

from rdzv import events
from rdzv.rendezvous.dynamic import DynamicRendezvousHandler, RendezvousTimeout
from rdzv.store.base import Store

_real_monotonic = time.monotonic
_out_lock = threading.Lock()


def emit(**fields: Any) -> None:
    fields.setdefault("t", _real_monotonic())
    with _out_lock:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()


def skew_clocks(wall: float, mono: float) -> None:
    real_time = time.time
    real_mono = time.monotonic
    if wall:
        time.time = lambda: real_time() + wall  # type: ignore[assignment]

        class SkewedDatetime(_dt.datetime):
            @classmethod
            def now(cls, tz: Any = None) -> Any:  # type: ignore[override]
                return super().now(tz) + _dt.timedelta(seconds=wall)

            @classmethod
            def utcnow(cls) -> Any:  # type: ignore[override]
                return super().utcnow() + _dt.timedelta(seconds=wall)

        _dt.datetime = SkewedDatetime  # type: ignore[misc]
    if mono:
        time.monotonic = lambda: real_mono() + mono  # type: ignore[assignment]


def open_store(spec: dict[str, Any]) -> Store:
    if spec["kind"] == "file":
        from rdzv.store.file import FileStore

        return FileStore(spec["path"], timeout=30)
    from rdzv.store.tcp import TCPStore

    store: Store = TCPStore(spec["host"], spec["port"], is_master=False, timeout=30)
    return store


def main() -> None:
    config = json.loads(sys.argv[1])
    skew = config.get("skew") or {}
    skew_clocks(float(skew.get("time", 0)), float(skew.get("monotonic", 0)))
    store = open_store(config["store"])
    handler = DynamicRendezvousHandler(
        config["run_id"],
        store,
        config["min"],
        config["max"],
        local_addr=config["local_addr"],
        timeout=RendezvousTimeout(join=config.get("join", 60), last_call=config["last_call"]),
        keep_alive_interval=config["interval"],
        keep_alive_max_attempt=config["attempts"],
        master_endpoint=(config["local_addr"], 29400),
    )
    events.add_callback(
        lambda e: emit(event="rdzv", message=e.message, state=str(e.node_state.value))
    )
    emit(event="ready", pid=__import__("os").getpid())
    for line in sys.stdin:
        command = line.strip()
        if command == "join":
            try:
                info = handler.next_rendezvous()
            except Exception as exc:
                emit(event="error", type=type(exc).__name__, msg=str(exc))
                continue
            boot = info.bootstrap_store_info
            assert boot is not None
            emit(
                event="joined",
                rank=info.rank,
                world=info.world_size,
                master=[boot.master_addr, boot.master_port],
            )
        elif command == "waiting":
            emit(event="waiting", n=handler.num_nodes_waiting())
        elif command == "closed":
            emit(event="closed", value=handler.is_closed())
        elif command == "exit":
            break
    emit(event="bye")


if __name__ == "__main__":
    main()
