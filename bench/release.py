"""Release many rendezvous nodes at once and time them (shared by the rendezvous benchmarks)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["NodeThreads", "Released"]


@dataclass
class Released:
    """What happened after :meth:`NodeThreads.release`: monotonic times in seconds."""

    start: float
    done: list[float] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def seconds(self) -> float:
        """From the release to the last node holding its rank."""
        return max(self.done) - self.start


class NodeThreads:
    """One thread per handler, each parked until :meth:`release`, then ``next_rendezvous()``."""

    def __init__(self, handlers: list[Any]) -> None:
        self._go = threading.Event()
        self._lock = threading.Lock()
        self._result = Released(start=0.0)
        self._threads = [
            threading.Thread(target=self._node, args=(h,), daemon=True) for h in handlers
        ]
        for t in self._threads:
            t.start()

    def _node(self, handler: Any) -> None:
        self._go.wait()
        try:
            info = handler.next_rendezvous()
        except Exception as exc:  # reported by the caller
            with self._lock:
                self._result.errors.append(f"{type(exc).__name__}: {exc}"[:200])
            return
        finished = time.monotonic()
        with self._lock:
            self._result.done.append(finished)
            self._result.ranks.append(info.rank)

    def release(self, join_timeout: float) -> Released:
        """Let every node go at once; wait up to ``join_timeout`` seconds per thread."""
        self._result.start = time.monotonic()
        self._go.set()
        for t in self._threads:
            t.join(join_timeout)
        with self._lock:
            return Released(
                self._result.start,
                list(self._result.done),
                list(self._result.ranks),
                list(self._result.errors),
            )
