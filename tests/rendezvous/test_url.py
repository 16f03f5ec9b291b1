"""URL rendezvous: every URL form, the query rules, the errors and real multi-process jobs."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import rdzv
from rdzv import FileStore, HashStore, Store, TCPStore
from rdzv.errors import RendezvousError, StoreError
from rdzv.rendezvous import url as url_mod
from rdzv.rendezvous.url import (
    DEFAULT_PG_TIMEOUT,
    parse_url_query,
    register_rendezvous_handler,
    registered_schemes,
    rendezvous,
)
from tests.conftest import subprocess_env
from tests.ports import reserved_port

ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)


class Recorder:
    """A URL handler that records what :func:`rendezvous` passed to it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, url: str, **kwargs: Any) -> Iterator[tuple[Store, int, int]]:
        self.calls.append((url, kwargs))
        query = parse_url_query(url)
        yield HashStore(), int(query.get("rank", -1)), int(query.get("world_size", -1))


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setitem(url_mod._handlers, "rec", rec)
    return rec


# --------------------------------------------------------------------------- package surface
def test_rdzv_rendezvous_is_callable_and_a_package() -> None:
    import rdzv.rendezvous.api  # binds the subpackage on rdzv

    assert rdzv.rendezvous.rendezvous is rendezvous
    assert rdzv.rendezvous.api.RendezvousParameters is not None
    assert rdzv.register_rendezvous_handler is register_rendezvous_handler


def test_calling_the_package_runs_rendezvous(recorder: Recorder) -> None:
    store, rank, world_size = next(rdzv.rendezvous("rec://x?rank=1&world_size=2"))
    assert (rank, world_size) == (1, 2) and isinstance(store, HashStore)


def test_builtin_schemes() -> None:
    assert {"tcp", "env", "file"} <= set(registered_schemes())


# --------------------------------------------------------------------------- query decoding
def test_query_decoding() -> None:
    assert parse_url_query("x://h/p?a=1&b=%2Fpath%20x&c=x+y&&d=&e=%3D") == {
        "a": "1",
        "b": "/path x",
        "c": "x y",
        "d": "",
        "e": "=",
    }


def test_query_empty() -> None:
    assert parse_url_query("tcp://h:1") == {}
    assert parse_url_query("tcp://h:1?") == {}


def test_bare_parameter_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"URL query parameter 'rank' has no value.*rank=<value>"):
        parse_url_query("tcp://h:1?rank&world_size=2")


def test_repeated_parameter_same_value_is_fine() -> None:
    assert parse_url_query("x://?a=1&a=1") == {"a": "1"}


def test_repeated_parameter_different_values_is_an_error() -> None:
    with pytest.raises(
        ValueError, match=r"'rank' is given twice with different values \('0' and '1'\)"
    ):
        parse_url_query("x://?rank=0&rank=1")


# --------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("url", [None, 5, ["tcp://h:1"]])
def test_url_must_be_a_string(url: Any) -> None:
    with pytest.raises(TypeError, match="`url` must be a string"):
        rendezvous(url)


@pytest.mark.parametrize(("name", "value"), [("rank", "0"), ("rank", 1.0), ("world_size", True)])
def test_rank_and_world_size_must_be_integers(name: str, value: Any) -> None:
    with pytest.raises(TypeError, match=f"`{name}` must be an integer"):
        rendezvous("tcp://h:1", **{name: value})


def test_timeout_type_is_checked(recorder: Recorder) -> None:
    with pytest.raises(TypeError, match="timeout"):
        rendezvous("rec://x", timeout="5")  # type: ignore[arg-type]


def test_bytes_url(recorder: Recorder) -> None:
    _, rank, world_size = next(rendezvous(b"rec://h?rank=0&world_size=1"))
    assert (rank, world_size) == (0, 1)


def test_unknown_scheme_lists_known_ones() -> None:
    with pytest.raises(
        RendezvousError, match=r"No rendezvous handler for foo://.*env://, file://, tcp://"
    ):
        rendezvous("foo://h:1")
    with pytest.raises(RuntimeError, match=r"\(no scheme\)"):
        rendezvous("/tmp/store")


def test_arguments_are_written_into_the_query(recorder: Recorder) -> None:
    next(rendezvous("rec://h:1/p?x=a%20b", rank=2, world_size=4, timeout=7, extra="e"))
    url, kwargs = recorder.calls[0]
    assert url.startswith("rec://h:1/p?")
    assert parse_url_query(url) == {"x": "a b", "rank": "2", "world_size": "4"}
    assert kwargs == {"timeout": 7, "extra": "e"}


def test_url_without_arguments_is_passed_unchanged(recorder: Recorder) -> None:
    next(rendezvous("rec://h?rank=0&world_size=1&odd=%41"))
    url, kwargs = recorder.calls[0]
    assert url == "rec://h?rank=0&world_size=1&odd=%41"
    assert kwargs == {"timeout": DEFAULT_PG_TIMEOUT}


def test_node_arguments_in_url_and_as_arguments_raise_as_torch(recorder: Recorder) -> None:
    # torch's rule: arguments may not be combined with a query that has rank or world_size.
    cases = [
        ("rec://h?rank=1&world_size=2", {"rank": 0}),
        ("rec://h?rank=1&world_size=2", {"world_size": 3}),
        ("rec://h?rank=1&world_size=2", {"rank": 1, "world_size": 2}),  # even if equal
        ("rec://h?world_size=3", {"rank": 2}),
    ]
    for url, kwargs in cases:
        with pytest.raises(
            AssertionError, match=r"has node-specific arguments\(rank, world_size\)"
        ):
            rendezvous(url, **kwargs)
        with pytest.raises(ValueError, match=r"^The url: rec://h\?"):
            rendezvous(url, **kwargs)
    assert recorder.calls == []


# --------------------------------------------------------------------------- registration
def test_register_custom_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(url_mod, "_handlers", dict(url_mod._handlers))
    rec = Recorder()
    register_rendezvous_handler("My-Scheme+v1.0", rec)
    register_rendezvous_handler("my-scheme+v1.0", rec)  # same handler again: no-op
    assert "my-scheme+v1.0" in registered_schemes()
    next(rendezvous("MY-SCHEME+V1.0://host?rank=0&world_size=1"))
    assert len(rec.calls) == 1
    with pytest.raises(
        RuntimeError, match=r"^Rendezvous handler for my-scheme\+v1.0:// already registered$"
    ):
        register_rendezvous_handler("my-scheme+v1.0", Recorder())


@pytest.mark.parametrize("scheme", ["", "1abc", "tcp://", "a b", "a_b", None])
def test_register_rejects_bad_schemes(scheme: Any) -> None:
    with pytest.raises(ValueError, match="invalid rendezvous URL scheme"):
        register_rendezvous_handler(scheme, Recorder())


def test_register_rejects_non_callable() -> None:
    with pytest.raises(TypeError, match="must be callable"):
        register_rendezvous_handler("notcallable", "handler")  # type: ignore[arg-type]


def test_builtin_scheme_cannot_be_replaced() -> None:
    with pytest.raises(RuntimeError, match="tcp:// already registered"):
        register_rendezvous_handler("tcp", Recorder())


# --------------------------------------------------------------------------- tcp:// errors
@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("tcp://127.0.0.1?rank=0&world_size=1", r"tcp:// rendezvous: port number missing in"),
        ("tcp://127.0.0.1:70000?rank=0&world_size=1", r"invalid port .*Port out of range 0-65535"),
        ("tcp://127.0.0.1:x?rank=0&world_size=1", r"invalid port"),
        ("tcp://:29500?rank=0&world_size=1", r"host name missing"),
        ("tcp://127.0.0.1:1?world_size=1", r"rank parameter missing: add \?rank=<r>"),
        ("tcp://127.0.0.1:1?rank=0", r"world size parameter missing"),
        ("tcp://127.0.0.1:1", r"rank parameter missing and world size parameter missing"),
        (
            "tcp://127.0.0.1:1?rank=a&world_size=1",
            r"rank must be an integer, got 'a' \(URL query\)",
        ),
        ("tcp://127.0.0.1:1?rank=0&world_size=", r"world_size must be an integer, got ''"),
        ("tcp://127.0.0.1:1?rank=2&world_size=2", r"rank must be in \[0, world_size\) = \[0, 2\)"),
        ("tcp://127.0.0.1:1?rank=-1&world_size=2", r"rank must be in"),
        ("tcp://127.0.0.1:1?rank=0&world_size=0", r"world_size must be >= 1, got 0"),
        ("tcp://::1:29500?rank=0&world_size=1", r"IPv6 addresses must be in brackets"),
        (
            "tcp://[::1?rank=0&world_size=1",
            r"malformed rendezvous URL .* an IPv6 address goes in brackets, closed before",
        ),
        ("tcp://127.0.0.1:0?rank=1&world_size=2", r"port 0 .* cannot be reached by rank 1"),
        ("tcp://127.0.0.1:1?rank&world_size=1", r"parameter 'rank' has no value"),
    ],
)
def test_tcp_errors(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        next(rendezvous(url))


def test_tcp_errors_are_raised_at_the_call() -> None:
    # Validation happens before any store is created, when rendezvous() is called.
    with pytest.raises(ValueError, match="Error initializing rdzv using tcp:// rendezvous"):
        rendezvous("tcp://127.0.0.1?rank=0&world_size=1")


def test_tcp_argument_fills_missing_parameter() -> None:
    with pytest.raises(ValueError, match="port number missing"):
        rendezvous("tcp://127.0.0.1", rank=0, world_size=1)


def test_tcp_agent_store_flag_must_be_boolean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "maybe")
    with pytest.raises(ValueError, match=r"TORCHELASTIC_USE_AGENT_STORE='maybe' is not a boolean"):
        rendezvous("tcp://127.0.0.1:1?rank=0&world_size=1")


# --------------------------------------------------------------------------- env:// errors
def test_env_lists_every_missing_variable() -> None:
    with pytest.raises(
        ValueError,
        match=r"environment variables RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT expected, "
        r"but are not set",
    ):
        rendezvous("env://")


def test_env_empty_variable_counts_as_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(
        ValueError, match=r"environment variable MASTER_ADDR expected, but is not set"
    ):
        rendezvous("env://")


def test_env_query_and_arguments_replace_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    # rank and world_size from the query: RANK/WORLD_SIZE are not needed, and rank 3 of 2
    # shows that those values (not the absent variables) were checked.
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size\) = \[0, 2\), got 3"):
        rendezvous("env://?rank=3&world_size=2")


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        (
            "MASTER_PORT",
            "http",
            r"MASTER_PORT must be an integer, got 'http' \(environment variable MASTER_PORT\)",
        ),
        ("MASTER_PORT", "70000", r"port must have value from 0 to 65535 but was 70000"),
        ("RANK", "x", r"rank must be an integer, got 'x' \(environment variable RANK\)"),
        ("WORLD_SIZE", "0", r"world_size must be >= 1"),
        ("TORCHELASTIC_USE_AGENT_STORE", "2", r"not a boolean"),
    ],
)
def test_env_bad_values(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, message: str
) -> None:
    for name, default in (
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "1"),
    ):
        monkeypatch.setenv(name, default)
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=message):
        rendezvous("env://")


# --------------------------------------------------------------------------- file://
@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("file://?rank=0&world_size=1", r"file:// rendezvous: path missing"),
        ("file:///tmp/x?world_size=1", r"rank parameter missing"),
        ("file:///tmp/x?rank=0", r"world size parameter missing"),
        ("file:///tmp/x?rank=1&world_size=1", r"rank must be in"),
    ],
)
def test_file_errors(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rendezvous(url)


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("file:///tmp/a%20b/store", "/tmp/a b/store"),
        ("file://localhost/tmp/s", "/tmp/s"),
        ("file://relative/dir/s", "relative/dir/s"),
        ("file:///tmp/x%3Fy", "/tmp/x?y"),
    ],
)
def test_file_paths(url: str, path: str) -> None:
    assert url_mod._file_path(url_mod.urlsplit(url)) == path


def test_file_store_single_rank(tmp_path: Path) -> None:
    path = tmp_path / "dir with space" / "store"
    path.parent.mkdir()
    url = "file://" + str(path).replace(" ", "%20")
    gen = rendezvous(url, rank=0, world_size=1, timeout=timedelta(seconds=7))
    store, rank, world_size = next(gen)
    assert isinstance(store, FileStore) and (rank, world_size) == (0, 1)
    assert store.timeout == timedelta(seconds=7)
    store.set("k", b"v")
    assert FileStore(path, 1).get("k") == b"v"
    with pytest.raises(
        RendezvousError, match=r"Unable to perform re-rendezvous using file:// method"
    ):
        next(gen)


def _run_job(
    urls_and_args: list[tuple[str, int, int]],
    env: dict[str, str] | None = None,
    rank_env: bool = False,
) -> list[dict[str, Any]]:
    """Run one url_worker per (url, rank, world) and return their JSON results by rank.

    ``env`` is added to every worker's environment; with ``rank_env``, the rank goes into
    ``RANK`` and the worker's rank argument is -1 (env:// style)."""
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.rendezvous.url_worker",
                url,
                "-1" if rank_env else str(rank),
                str(world),
            ],
            env=subprocess_env(**(env or {}), **({"RANK": str(rank)} if rank_env else {})),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for url, rank, world in urls_and_args
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return sorted(results, key=lambda r: r["rank"])


def _check_job(results: list[dict[str, Any]], world_size: int, store: str) -> None:
    """Every rank of a url_worker job saw the same world, every pid and every rank."""
    pids = results[0]["pids"]
    assert len(set(pids)) == world_size
    rank_sum = world_size * (world_size - 1) // 2
    for rank, result in enumerate(results):
        expected = {"rank": rank, "world_size": world_size, "pids": pids, "rank_sum": rank_sum}
        assert result == {**expected, "store": store}


def test_file_rendezvous_across_processes(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/shared?world_size=3"
    _check_job(_run_job([(f"{url}&rank={rank}", -1, -1) for rank in range(3)]), 3, "FileStore")


# --------------------------------------------------------------------------- tcp:// and env://
def test_tcp_single_rank_on_ephemeral_port() -> None:
    gen = rendezvous("tcp://127.0.0.1:0?rank=0&world_size=1", timeout=timedelta(seconds=9))
    store, rank, world_size = next(gen)
    assert isinstance(store, TCPStore) and (rank, world_size) == (0, 1)
    assert store.timeout == timedelta(seconds=9)
    assert store.port > 0
    store.set("k", b"v")
    assert TCPStore("127.0.0.1", store.port, None, False, 5).get("k") == b"v"
    with pytest.raises(
        RendezvousError, match=r"Unable to perform re-rendezvous using tcp:// method"
    ):
        next(gen)


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]"])
def test_tcp_rendezvous_across_processes(host: str) -> None:
    bare = host.strip("[]")
    with reserved_port(bare) as port:
        url = f"tcp://{host}:{port}?world_size=3&use_libuv=0"
        results = _run_job([(f"{url}&rank={rank}", -1, -1) for rank in range(3)])
    _check_job(results, 3, "TCPStore")


def test_env_rendezvous_across_processes() -> None:
    with reserved_port() as port:
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
        results = _run_job([("env://", rank, -1) for rank in range(2)], env, rank_env=True)
    _check_job(results, 2, "TCPStore")


@pytest.mark.parametrize("flag", ["True", "true", "1"])
def test_agent_store_makes_every_rank_a_client(flag: str) -> None:
    # The "agent" hosts the store here; rank 0 must connect to it instead of binding.
    agent = TCPStore("127.0.0.1", 0, None, True, 30, wait_for_workers=False)
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(agent.port),
        "WORLD_SIZE": "2",
        "TORCHELASTIC_USE_AGENT_STORE": flag,
    }
    results = _run_job([("env://", rank, -1) for rank in range(2)], env=env)
    assert [(r["rank"], r["rank_sum"]) for r in results] == [(0, 1), (1, 1)]
    assert int(agent.get("pid/0")) == results[0]["pids"][0]


@pytest.mark.parametrize("flag", ["False", "0", ""])
def test_without_agent_store_rank_0_binds(flag: str) -> None:
    agent = TCPStore("127.0.0.1", 0, None, True, 30, wait_for_workers=False)
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(agent.port),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "TORCHELASTIC_USE_AGENT_STORE": flag,
    }
    code = "import rdzv; next(rdzv.rendezvous('env://', timeout=5))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "NetworkError" in out.stderr and str(agent.port) in out.stderr


def test_file_on_a_file_system_that_refuses_new_files() -> None:
    with pytest.raises(StoreError, match="does not let files be created there") as info:
        next(rendezvous("file:///proc/rdzv-test?rank=0&world_size=1"))
    assert "removed while" not in str(info.value)
