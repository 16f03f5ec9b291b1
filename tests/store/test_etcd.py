"""EtcdStore beyond the shared contract: layout, leases/TTLs, limits, configuration errors,
authentication and TLS, against real etcd processes."""

from __future__ import annotations

import base64
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import rdzv
from rdzv import AuthError, NetworkError, StoreError, StoreTimeoutError
from rdzv.store.etcd import EtcdStore, LeaseExpiredError
from rdzv.store.etcd_client import EtcdEndpoint, parse_endpoints, prefix_range_end
from tests.conftest import subprocess_env
from tests.etcd_fixtures import (
    MAX_REQUEST_BYTES,
    MAX_TXN_OPS,
    EtcdMember,
    free_ports,
    fresh_prefix,
    start_member,
)


@pytest.fixture
def store(etcd_member: EtcdMember) -> Iterator[EtcdStore]:
    s = EtcdStore(
        etcd_member.endpoint,
        fresh_prefix(),
        timeout=5,
        max_txn_ops=MAX_TXN_OPS,
        max_request_bytes=MAX_REQUEST_BYTES,
    )
    yield s
    s.close()


def _etcd_get(member: EtcdMember, key: bytes) -> bytes | None:
    """Read a raw etcd key through etcd's own HTTP gateway (not through rdzv)."""
    reply = member.http("/v3/kv/range", {"key": base64.b64encode(key).decode()})
    kvs = reply.get("kvs")
    if not kvs:
        return None
    assert isinstance(kvs, list)
    return base64.b64decode(kvs[0].get("value", ""))


# --------------------------------------------------------------------------- packaging
def test_lazy_top_level_name() -> None:
    assert rdzv.EtcdStore is EtcdStore


def test_import_without_the_client_package_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['pyetcd'] = None\n"
        "try:\n    import rdzv.store.etcd\nexcept ImportError as e:\n    print(e)\n"
        "try:\n    import rdzv; rdzv.EtcdStore\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True
    )
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2, out
    assert all('pip install "rdzv[etcd]"' in line for line in lines)


# --------------------------------------------------------------------------- endpoints
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("h", [EtcdEndpoint("h", 2379)]),
        ("h:1", [EtcdEndpoint("h", 1)]),
        ("http://h:2,https://g:3/", [EtcdEndpoint("h", 2, False), EtcdEndpoint("g", 3, True)]),
        (["[::1]:5", "::1"], [EtcdEndpoint("::1", 5), EtcdEndpoint("::1", 2379)]),
    ],
)
def test_parse_endpoints(spec: str | list[str], expected: list[EtcdEndpoint]) -> None:
    assert parse_endpoints(spec) == expected


@pytest.mark.parametrize("bad", ["h:0", "h:x", "h:70000", "[::1:5", "ftp://h:1", ":5", ""])
def test_bad_endpoints_are_named(bad: str) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        parse_endpoints(bad)


def test_prefix_range_end() -> None:
    assert prefix_range_end(b"a/") == b"a0"
    assert prefix_range_end(b"a\xff") == b"b"
    assert prefix_range_end(b"\xff") == b"\0"


# --------------------------------------------------------------------------- layout
def test_keys_and_queues_live_under_the_prefix(store: EtcdStore, etcd_member: EtcdMember) -> None:
    store.set("a/b", b"1")
    store.add("n", 3)
    store.queue_push("q", b"item")
    raw = store.prefix.encode()
    assert _etcd_get(etcd_member, raw + b"k/a/b") == b"1"
    assert _etcd_get(etcd_member, raw + b"k/n") == b"3"
    reply = etcd_member.http(
        "/v3/kv/range",
        {
            "key": base64.b64encode(raw + b"q/").decode(),
            "range_end": base64.b64encode(prefix_range_end(raw + b"q/")).decode(),
        },
    )
    assert reply.get("count") == "1"


def test_prefixes_are_independent(store: EtcdStore, etcd_member: EtcdMember) -> None:
    other = EtcdStore(etcd_member.endpoint, fresh_prefix().rstrip("/"), timeout=5)
    assert other.prefix.endswith("/")
    store.set("same", b"mine")
    other.set("same", b"theirs")
    assert store.get("same") == b"mine"
    assert other.num_keys() == 1
    other.close()


def test_clone_is_a_new_client_on_the_same_data(store: EtcdStore) -> None:
    clone = store.clone()
    assert clone is not store
    assert clone.prefix == store.prefix and clone.endpoints == store.endpoints
    clone.set("c", b"1")
    assert store.get("c") == b"1"
    clone.close()
    with pytest.raises(NetworkError, match="closed"):
        clone.get("c")
    assert store.get("c") == b"1"


def test_session_key_is_private_and_removed_on_close(
    store: EtcdStore, etcd_member: EtcdMember
) -> None:
    writer = store.clone()
    writer.add("n", 1)  # a guarded write creates the writer's session key
    raw = store.prefix.encode() + b"s/"
    count = {
        "key": base64.b64encode(raw).decode(),
        "range_end": base64.b64encode(prefix_range_end(raw)).decode(),
        "count_only": True,
    }
    assert etcd_member.http("/v3/kv/range", count).get("count") == "1"
    assert store.list_keys() == ["n"]
    writer.close()
    assert etcd_member.http("/v3/kv/range", count).get("count") is None  # zero is omitted


def test_a_write_between_read_and_watch_is_not_missed(store: EtcdStore) -> None:
    # Many short waits racing with writes: each wait either sees the key in its read or
    # gets the write from the watch that starts at the read's revision + 1.
    writer = store.clone()
    for i in range(30):
        key = f"race{i}"
        t = threading.Thread(target=writer.set, args=(key, b"x"))
        t.start()
        assert store.get(key) == b"x"
        t.join(5)
    writer.close()


# --------------------------------------------------------------------------- leases
def test_set_with_ttl_expires_on_the_server(store: EtcdStore) -> None:
    store.set("short", b"v", ttl=1)  # etcd raises TTLs below its minimum (2 s by default)
    store.set("long", b"v")
    assert store.get("short") == b"v"
    deadline = time.monotonic() + 10
    while store.check(["short"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not store.check(["short"])
    assert store.check(["long"])


def test_lease_refresh_and_revoke(store: EtcdStore) -> None:
    lease = store.lease(3)
    assert lease.ttl >= 3
    store.set("held1", b"1", lease=lease)
    store.set("held2", b"2", lease=lease)
    assert 0 < lease.remaining() <= lease.ttl
    assert lease.refresh() == lease.ttl
    lease.revoke()
    assert not store.check(["held1"]) and not store.check(["held2"])
    with pytest.raises(LeaseExpiredError, match="expired or was revoked"):
        lease.refresh()
    with pytest.raises(LeaseExpiredError, match="set 'held3'"):
        store.set("held3", b"3", lease=lease)
    assert lease.remaining() == -1
    lease.revoke()  # revoking twice is harmless


def test_ttl_arguments_are_checked(store: EtcdStore) -> None:
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="ttl"):
            store.set("k", b"v", ttl=bad)
    with pytest.raises(TypeError, match="ttl"):
        store.lease("5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both"):
        store.set("k", b"v", ttl=5, lease=store.lease(5))
    assert store.num_keys() == 0


# --------------------------------------------------------------------------- limits
def test_value_over_the_server_request_limit_is_refused_clearly(store: EtcdStore) -> None:
    with pytest.raises(StoreError, match="max-request-bytes") as info:
        store.set("huge", b"x" * (MAX_REQUEST_BYTES + 1024 * 1024))
    assert "huge" in str(info.value)
    assert not store.check(["huge"])
    store.set("after", b"ok")
    assert store.get("after") == b"ok"


def test_multi_set_batches_beyond_the_server_txn_limit_fail_clearly(
    etcd_member: EtcdMember,
) -> None:
    # A client told a larger --max-txn-ops than the server has: the batch is refused whole.
    store = EtcdStore(etcd_member.endpoint, fresh_prefix(), timeout=5, max_txn_ops=MAX_TXN_OPS * 2)
    keys = [f"k{i}" for i in range(MAX_TXN_OPS + 1)]
    with pytest.raises(StoreError, match="max-txn-ops"):
        store.multi_set(keys, [b"v"] * len(keys))
    assert store.num_keys() == 0
    store.close()


def test_multi_set_respects_default_limits(store: EtcdStore, etcd_member: EtcdMember) -> None:
    small = EtcdStore(etcd_member.endpoint, store.prefix, timeout=5)  # 128 ops, 1.5 MiB
    keys = [f"b{i}" for i in range(300)]
    small.multi_set(keys, [b"y" * 20_000] * 300)  # 6 MB in several transactions
    assert store.num_keys() == 300
    small.close()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_txn_ops": 0}, "max_txn_ops"),
        ({"max_request_bytes": -1}, "max_request_bytes"),
        ({"cert": "c.pem"}, "both cert and key"),
        ({"user": "u"}, "both user and password"),
    ],
)
def test_bad_options(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EtcdStore("127.0.0.1:1", "/p/", **kwargs)  # type: ignore[arg-type]


def test_missing_tls_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope-ca.pem"
    with pytest.raises(FileNotFoundError, match="ca_cert") as info:
        EtcdStore("127.0.0.1:1", ca_cert=missing)
    assert str(missing) in str(info.value)


# --------------------------------------------------------------------------- unreachable
def test_unreachable_endpoints_fail_within_the_timeout_naming_them() -> None:
    ports = free_ports(2)
    endpoints = [f"127.0.0.1:{p}" for p in ports]
    start = time.monotonic()
    with pytest.raises(NetworkError) as info:
        EtcdStore(endpoints, timeout=1)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert all(e in message for e in endpoints)
    assert "within 1 s" in message


def test_dead_endpoint_in_the_list_is_skipped(etcd_member: EtcdMember) -> None:
    dead = f"127.0.0.1:{free_ports(1)[0]}"
    store = EtcdStore([dead, etcd_member.endpoint], fresh_prefix(), timeout=5)
    store.set("k", b"v")
    assert store.get("k") == b"v"
    assert store.endpoint == etcd_member.endpoint
    store.close()


# --------------------------------------------------------------------------- auth
@pytest.fixture(scope="module")
def auth_member(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdMember]:
    member = start_member(tmp_path_factory.mktemp("etcd-auth"), "auth")
    member.etcdctl("user", "add", "root:rootpw")
    member.etcdctl("user", "add", "alice:alicepw")
    member.etcdctl("role", "add", "app")
    member.etcdctl("role", "grant-permission", "app", "--prefix=true", "readwrite", "/app/")
    member.etcdctl("user", "grant-role", "alice", "app")
    member.etcdctl("auth", "enable")
    yield member
    member.stop(kill=True)


def test_auth_right_password_works(auth_member: EtcdMember) -> None:
    store = EtcdStore(auth_member.endpoint, "/app/s/", timeout=5, user="alice", password="alicepw")
    store.set("k", b"v")
    assert store.get("k") == b"v"
    assert store.add("n", 2) == 2
    store.close()


def test_auth_wrong_password(auth_member: EtcdMember) -> None:
    with pytest.raises(AuthError, match=r"'alice'.*wrong user name or password"):
        EtcdStore(auth_member.endpoint, "/app/s/", timeout=5, user="alice", password="nope")


def test_auth_missing_credentials_or_permission(auth_member: EtcdMember) -> None:
    with pytest.raises(AuthError, match="pass user and password"):
        EtcdStore(auth_member.endpoint, "/app/s/", timeout=5)
    with pytest.raises(AuthError, match="permission denied for user 'alice'"):
        EtcdStore(auth_member.endpoint, "/elsewhere/", timeout=5, user="alice", password="alicepw")


def test_auth_not_enabled_but_user_given(etcd_member: EtcdMember) -> None:
    with pytest.raises(AuthError, match="authentication disabled"):
        EtcdStore(etcd_member.endpoint, fresh_prefix(), timeout=5, user="u", password="p")


def test_auth_token_forgotten_by_a_restart_is_renewed(auth_member: EtcdMember) -> None:
    store = EtcdStore(auth_member.endpoint, "/app/t/", timeout=10, user="alice", password="alicepw")
    store.set("before", b"1")
    auth_member.restart()  # simple tokens live in the member's memory
    assert store.get("before") == b"1"
    store.set("after", b"2")
    assert store.num_keys() == 2
    store.close()


# --------------------------------------------------------------------------- TLS
def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tls")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"), "-subj", "/CN=rdzv-test-ca",
    )  # fmt: skip
    ext = d / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    for name in ("server", "client"):
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / f"{name}.key"),
            "-out", str(d / f"{name}.csr"), "-subj", f"/CN={name}",
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"),
            "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
            "-out", str(d / f"{name}.pem"), "-extfile", str(ext),
        )  # fmt: skip
    return {
        "ca": d / "ca.pem",
        "server_cert": d / "server.pem",
        "server_key": d / "server.key",
        "client_cert": d / "client.pem",
        "client_key": d / "client.key",
    }


@pytest.fixture(scope="module")
def tls_member(
    tmp_path_factory: pytest.TempPathFactory, tls_files: dict[str, Path]
) -> Iterator[EtcdMember]:
    member = start_member(tmp_path_factory.mktemp("etcd-tls"), "tls", tls=tls_files)
    yield member
    member.stop(kill=True)


def test_tls_with_client_certificate(tls_member: EtcdMember, tls_files: dict[str, Path]) -> None:
    store = EtcdStore(
        f"https://{tls_member.endpoint}",
        fresh_prefix(),
        timeout=5,
        ca_cert=tls_files["ca"],
        cert=tls_files["client_cert"],
        key=tls_files["client_key"],
    )
    store.set("secure", b"1")
    assert store.get("secure") == b"1"
    assert store.clone().get("secure") == b"1"
    store.close()


def test_tls_server_refuses_plaintext_and_missing_client_cert(
    tls_member: EtcdMember, tls_files: dict[str, Path]
) -> None:
    with pytest.raises(NetworkError, match=tls_member.endpoint):
        EtcdStore(tls_member.endpoint, fresh_prefix(), timeout=1)
    with pytest.raises(NetworkError, match=tls_member.endpoint):
        EtcdStore(tls_member.endpoint, fresh_prefix(), timeout=1, ca_cert=tls_files["ca"])


def test_blocking_get_times_out_even_with_tls(
    tls_member: EtcdMember, tls_files: dict[str, Path]
) -> None:
    store = EtcdStore(
        tls_member.endpoint,
        fresh_prefix(),
        timeout=0.2,
        ca_cert=tls_files["ca"],
        cert=tls_files["client_cert"],
        key=tls_files["client_key"],
    )
    with pytest.raises(StoreTimeoutError, match="missing"):
        store.get("missing")
    store.close()
