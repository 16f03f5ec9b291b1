"""A one-node rendezvous handler over a HashStore, to test the agent without a network."""

from __future__ import annotations

import threading

from rdzv.rendezvous.api import (
    RendezvousClosedError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousStoreInfo,
)
from rdzv.store.hash import HashStore
from rdzv.store.prefix import PrefixStore


class LocalHandler(RendezvousHandler):
    """Every round completes at once with this single node; the workers' store address is a
    placeholder (the test workers do not use it). ``waiting`` is what ``num_nodes_waiting``
    reports (tests change it to simulate scale-up)."""

    def __init__(self, run_id: str = "test") -> None:
        self.store = HashStore()
        self.run_id = run_id
        self.rounds = 0
        self.waiting = 0
        self.closed = False
        self.shutdowns = 0
        self.lock = threading.Lock()

    def get_backend(self) -> str:
        return "local"

    @property
    def use_agent_store(self) -> bool:
        return True

    def next_rendezvous(self) -> RendezvousInfo:
        if self.closed:
            raise RendezvousClosedError()
        with self.lock:
            self.waiting = 0
            round_store = PrefixStore(f"round{self.rounds}", self.store)
            self.rounds += 1
        return RendezvousInfo(round_store, 0, 1, RendezvousStoreInfo("127.0.0.1", 29999))

    def is_closed(self) -> bool:
        return self.closed

    def set_closed(self) -> None:
        self.closed = True

    def num_nodes_waiting(self) -> int:
        return self.waiting

    def get_run_id(self) -> str:
        return self.run_id

    def shutdown(self) -> bool:
        self.shutdowns += 1
        self.closed = True
        return True
