"""``rdzv store``: shell access to a TCPStore server."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from rdzv.endpoint import parse_endpoint
from rdzv.store.tcp import TCPStore
from tests.conftest import subprocess_env


@pytest.fixture
def store() -> Iterator[TCPStore]:
    with TCPStore("127.0.0.1", 0, is_master=True, timeout=5) as s:
        yield s


def rdzv(store: TCPStore, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rdzv", "store", "--endpoint", f"127.0.0.1:{store.port}", *args],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_set_get_add_delete(store: TCPStore) -> None:
    assert rdzv(store, "set", "greeting", "héllo").returncode == 0
    assert store.get("greeting") == "héllo".encode()
    assert rdzv(store, "get", "greeting").stdout == "héllo\n"
    assert rdzv(store, "add", "n", "5").stdout == "5\n"
    assert rdzv(store, "add", "n", "-2").stdout == "3\n"
    assert rdzv(store, "delete", "n").stdout == "deleted\n"
    assert rdzv(store, "delete", "n").stdout == "absent\n"
    assert rdzv(store, "num-keys").stdout == "1\n"


def test_keys_with_sizes_and_json(store: TCPStore) -> None:
    store.multi_set(["a/1", "a/2", "b"], [b"x", b"yy", b"\xff\x00"])
    store.multi_get(["a/1", "a/2", "b"])  # round trip: the writes have run
    assert rdzv(store, "keys").stdout == "a/1\t1\na/2\t2\nb\t2\n"
    assert rdzv(store, "keys", "a/").stdout == "a/1\t1\na/2\t2\n"
    listed = json.loads(rdzv(store, "--json", "keys").stdout)
    assert listed == {
        "keys": [{"key": "a/1", "size": 1}, {"key": "a/2", "size": 2}, {"key": "b", "size": 2}]
    }
    assert json.loads(rdzv(store, "--json", "get", "b").stdout) == {
        "key": "b",
        "value_base64": "/wA=",
    }
    assert json.loads(rdzv(store, "--json", "get", "a/1").stdout) == {"key": "a/1", "value": "x"}
    assert json.loads(rdzv(store, "--json", "num-keys").stdout) == {"num_keys": 3}


def test_wait_and_errors(store: TCPStore) -> None:
    store.set("ready", b"1")
    assert rdzv(store, "wait", "ready").returncode == 0
    out = rdzv(store, "--timeout", "0.2", "wait", "ready", "missing")
    assert out.returncode == 1
    assert "wait timeout after 200ms" in out.stderr
    assert "missing" in out.stderr
    store.set("text", b"abc")
    assert store.get("text") == b"abc"
    out = rdzv(store, "add", "text", "1")
    assert out.returncode == 1
    assert "not a base-10 integer" in out.stderr


def test_unreachable_endpoint() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "rdzv",
            "store",
            "--endpoint",
            "127.0.0.1:1",
            "--timeout",
            "0.2",
            "num-keys",
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "could not connect" in out.stderr
    assert "127.0.0.1:1" in out.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:29500", ("127.0.0.1", 29500)), ("[::1]:80", ("::1", 80)), ("h:1", ("h", 1))],
)
def test_parse_endpoint(text: str, expected: tuple[str, int]) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize("text", ["nohost", ":80", "h:x", "h:0", "::1:80", "h:70000"])
def test_parse_endpoint_errors(text: str) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        parse_endpoint(text)


def test_keys_that_are_not_utf8_or_not_printable(store: TCPStore) -> None:
    """Keys another client wrote as raw bytes: listed keys can be checked, read and deleted,
    and ``rdzv store keys`` escapes them instead of writing escape sequences to the terminal."""
    from rdzv import wire
    from tests.server.helpers import Raw

    raw = Raw(store.port)
    raw.send(wire.encode_set(b"/\x1b[31mred\xff", b"v"))
    raw.ping()
    raw.close()
    (key,) = store.list_keys()
    assert key == "\x1b[31mred\udcff"
    assert store.check([key])
    assert store.get(key) == b"v"
    out = rdzv(store, "keys").stdout
    assert out == "\\x1b[31mred\\xff\t1\n"
    assert "\x1b" not in out
    assert store.delete_key(key)
    assert store.list_keys() == []
