"""Static rendezvous: torch's static_rendezvous_test, events, errors, real processes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from rdzv import PrefixStore, events
from rdzv.errors import RendezvousConnectionError, RendezvousTimeoutError
from rdzv.rendezvous.api import RendezvousParameters, RendezvousStoreInfo
from rdzv.rendezvous.static import StaticTCPRendezvous, create_rdzv_handler
from tests.conftest import subprocess_env
from tests.ports import reserved_port


def params(
    endpoint: str, nodes: int = 1, run_id: str = "run", **config: Any
) -> RendezvousParameters:
    return RendezvousParameters("static", endpoint, run_id, nodes, nodes, **config)


@pytest.fixture
def recorded() -> Iterator[list[events.RdzvEvent]]:
    seen: list[events.RdzvEvent] = []

    def keep(event: events.Event | events.RdzvEvent) -> None:
        if isinstance(event, events.RdzvEvent):
            seen.append(event)

    remove = events.add_callback(keep)
    yield seen
    remove()


# --------------------------------------------------------------------------- creation errors
@pytest.mark.parametrize(
    "endpoint", ["localhost", "", "[2001:0db8:85a3::8a2e:0370:7334]:90", "[::1]:90"]
)
def test_rank_is_checked_first(endpoint: str) -> None:
    # torch's test_missing_port / test_empty_endpoint / test_ipv6_addr*: no rank given.
    expected = "rank is absent in RendezvousParameters. Try adding --node-rank to the command line."
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        create_rdzv_handler(params(endpoint))


@pytest.mark.parametrize("endpoint", ["localhost", "127.0.0.1", "[::1]", "::1", "  host  "])
def test_missing_port(endpoint: str) -> None:
    expected = f"Port is absent in endpoint: {endpoint.strip()}. Try launching with --master-port."
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        create_rdzv_handler(params(endpoint, rank=0))


@pytest.mark.parametrize("endpoint", ["", "   "])
def test_empty_endpoint(endpoint: str) -> None:
    expected = (
        "endpoint is absent in RendezvousParameters. Try adding --master-addr and "
        "--master-port to the command line."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        create_rdzv_handler(params(endpoint, rank=0))


@pytest.mark.parametrize(
    ("endpoint", "addr", "port"),
    [
        ("[2001:0db8:85a3::8a2e:0370:7334]:90", "2001:0db8:85a3::8a2e:0370:7334", 90),
        ("[::1]:90", "::1", 90),
        ("node-1.example.com:29500", "node-1.example.com", 29500),
    ],
)
def test_endpoint_forms(endpoint: str, addr: str, port: int) -> None:
    handler = create_rdzv_handler(params(endpoint, rank=0))
    assert isinstance(handler, StaticTCPRendezvous)
    assert (handler.master_addr, handler.master_port) == (addr, port)


def test_creation_opens_no_socket_and_reports_static() -> None:
    handler = create_rdzv_handler(params("127.0.0.1:1", nodes=3, run_id="job", rank="2"))
    assert isinstance(handler, StaticTCPRendezvous)
    assert handler.get_backend() == "static"
    assert handler._store is None
    assert (handler.rank, handler.world_size, handler.get_run_id()) == (2, 3, "job")
    assert handler.timeout == timedelta(seconds=600)
    assert handler.use_agent_store is True
    assert handler.is_closed() is False
    handler.set_closed()
    assert handler.is_closed() is False
    assert handler.num_nodes_waiting() == 0
    assert handler.shutdown() is True


@pytest.mark.parametrize(("value", "seconds"), [("30", 30), (" 2.5 ", 2.5), (45, 45)])
def test_timeout_config(value: object, seconds: float) -> None:
    handler = create_rdzv_handler(params("h:1", rank=0, timeout=value))
    assert isinstance(handler, StaticTCPRendezvous)
    assert handler.timeout == timedelta(seconds=seconds)


@pytest.mark.parametrize("value", ["abc", "0", "-1", "inf", "nan", ""])
def test_bad_timeout_config(value: str) -> None:
    with pytest.raises(ValueError, match=r"option 'timeout' must be a positive number of seconds"):
        create_rdzv_handler(params("h:1", rank=0, timeout=value))


def test_bad_rank() -> None:
    with pytest.raises(ValueError, match=r"option 'rank' does not represent a valid integer"):
        create_rdzv_handler(params("h:1", rank="first"))
    with pytest.raises(ValueError, match=r"rank 2 is outside the world of 2 node\(s\).*\[0, 1\]"):
        create_rdzv_handler(params("h:1", nodes=2, rank=2))
    with pytest.raises(ValueError, match=r"rank -1 is outside"):
        create_rdzv_handler(params("h:1", rank=-1))


# --------------------------------------------------------------------------- one node
def test_multiple_calls_reuse_the_store(recorded: list[events.RdzvEvent]) -> None:
    # torch's test_static_rdzv_multiple_calls, on an ephemeral port.
    handler = create_rdzv_handler(params("127.0.0.1:0", run_id="solo", rank=0, timeout=10))
    first = handler.next_rendezvous()
    second = handler.next_rendezvous()
    for info in (first, second):
        assert (info.rank, info.world_size) == (0, 1)
        assert isinstance(info.store, PrefixStore) and info.store.prefix == "solo"
    first.store.set("k", b"v")
    assert second.store.get("k") == b"v"
    bootstrap = first.bootstrap_store_info
    assert isinstance(bootstrap, RendezvousStoreInfo)
    assert bootstrap.master_addr == "127.0.0.1"
    # The port actually bound, not the 0 of the endpoint.
    assert bootstrap.master_port == first.store.underlying_store.port > 0  # type: ignore[attr-defined]
    states = [(e.name, e.node_state, e.rank, e.run_id) for e in recorded]
    name = "StaticTCPRendezvous.next_rendezvous"
    assert states == [
        (name, events.NodeState.RUNNING, 0, "solo"),
        (name, events.NodeState.SUCCEEDED, 0, "solo"),
    ]
    assert recorded[1].duration_ms is not None and recorded[1].duration_ms >= 0
    assert recorded[1].master_endpoint == "127.0.0.1:0"


def test_unreachable_store_is_a_connection_error(recorded: list[events.RdzvEvent]) -> None:
    with reserved_port() as port:  # reserved, nobody listens
        handler = create_rdzv_handler(params(f"127.0.0.1:{port}", nodes=2, rank=1, timeout=1))
        with pytest.raises(
            (RendezvousConnectionError, RendezvousTimeoutError),
            match=rf"static rendezvous 'run': rank 1 .*127\.0\.0\.1:{port}",
        ):
            handler.next_rendezvous()
    assert [e.node_state for e in recorded] == [events.NodeState.RUNNING, events.NodeState.FAILED]
    assert recorded[1].error_trace


def test_missing_nodes_is_a_timeout(recorded: list[events.RdzvEvent]) -> None:
    handler = create_rdzv_handler(params("127.0.0.1:0", nodes=2, rank=0, timeout=0.5))
    with pytest.raises(
        RendezvousTimeoutError, match=r"rank 0 timed out after 0.5 s waiting for all 2 nodes"
    ):
        handler.next_rendezvous()
    assert recorded[-1].node_state is events.NodeState.FAILED


# --------------------------------------------------------------------------- real processes
def test_static_rendezvous_across_processes() -> None:
    nodes = 3
    with reserved_port() as port:
        endpoint = f"127.0.0.1:{port}"
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.rendezvous.static_worker",
                    endpoint,
                    str(rank),
                    str(nodes),
                    "job7",
                ],
                env=subprocess_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank in range(nodes)
        ]
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=90)
            assert proc.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    results.sort(key=lambda r: r["rank"])
    pids = results[0]["pids"]
    assert len(set(pids)) == nodes
    name = "StaticTCPRendezvous.next_rendezvous"
    for rank, result in enumerate(results):
        assert result["rank"] == rank and result["world_size"] == nodes
        assert result["pids"] == pids and result["rank_sum"] == 3
        assert result["bootstrap"] == ["127.0.0.1", port]
        assert result["events"] == [
            [name, "RUNNING", rank, "job7"],
            [name, "SUCCEEDED", rank, "job7"],
        ]
