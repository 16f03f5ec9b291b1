"""``rdzv serve``: run a standalone TCPStore server (torch-compatible) until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Any

from rdzv.cli.observe import add_observe_arguments, check_observe_host, observe_tokens
from rdzv.cli.observe import is_loopback as _is_loopback
from rdzv.errors import RdzvError
from rdzv.server import (
    DEFAULT_ACCEPT_QUEUES,
    DEFAULT_AUTH_TIMEOUT,
    DEFAULT_MAX_PARTIAL_BYTES,
    DEFAULT_MAX_WAIT_KEYS_PER_CONNECTION,
    DEFAULT_MAX_WAITS_PER_CONNECTION,
    DEFAULT_REQUEST_TIMEOUT,
)

#: ``rdzv serve --busy-poll-us`` default: covers a client's turnaround between two requests
#: (see rdzv.server.fastpath.BusyPoller and docs/performance.md).
DEFAULT_BUSY_POLL_US = 50.0

__all__ = ["register"]


def _number(kind: type[int] | type[float], low: float, strict: bool) -> Any:
    """An argparse ``type=``: a ``kind`` number ``> low`` (``strict``) or ``>= low``; else a
    usage error naming the flag (argparse adds the flag's name)."""
    word = "an integer" if kind is int else "a number"
    bound = f"> {low:g}" if strict else f">= {low:g}"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {word} {bound}, got {text!r}") from None
        if not (value > low if strict else value >= low):  # also refuses NaN
            raise argparse.ArgumentTypeError(f"must be {word} {bound}, got {text}")
        return value

    return parse


_positive_int = _number(int, 1, strict=False)
_positive_float = _number(float, 0, strict=True)
_non_negative_float = _number(float, 0, strict=False)


def _port(text: str) -> int:
    port: int = _number(int, 0, strict=False)(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (0..65535), got {text}")
    return port


def _check_host(host: str) -> None:
    """Raise ValueError naming ``--host`` when it does not resolve (``256.1.1.1``, a typo):
    that, not the lack of a token, is what the user has to fix."""
    import socket

    if host == "":
        return
    try:
        socket.getaddrinfo(host, None, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(
            f"--host {host!r} is not an IP address or a host name that resolves ({exc}); "
            "give an address of this machine, e.g. 127.0.0.1 or 0.0.0.0"
        ) from None


def _serve(args: argparse.Namespace) -> int:
    from rdzv.auth import NetworkAllowlist, load_token
    from rdzv.server import StoreServer, serve
    from rdzv.tls import server_context
    from rdzv.wire import Limits

    if args.log_level == "WARNING" and not args.quiet:
        # Connections and errors are what an operator of a standalone server wants to see.
        logging.getLogger("rdzv.server").setLevel(logging.INFO)
    try:
        limits = Limits(
            max_key_bytes=args.max_key_bytes,
            max_value_bytes=args.max_value_bytes,
            max_keys=args.max_keys,
        )
        token = load_token(None, args.token_file)
        allowlist = NetworkAllowlist(
            n for n in (args.allow_unauthenticated or "").split(",") if n.strip()
        )
        context = None
        if args.tls_cert is not None:
            context = server_context(
                args.tls_cert, args.tls_key, args.tls_ca, args.tls_require_client_cert
            )
        elif args.tls_key or args.tls_ca or args.tls_require_client_cert:
            raise ValueError("--tls-key/--tls-ca/--tls-require-client-cert need --tls-cert")
        if not (args.fsync_interval > 0 and math.isfinite(args.fsync_interval)):
            raise ValueError(
                f"--fsync-interval must be a number of seconds > 0, got {args.fsync_interval:g}"
            )
        for flag, size in (
            ("--max-output-bytes", args.max_output_bytes),
            ("--max-total-output-bytes", args.max_total_output_bytes),
        ):
            if size < 1:
                raise ValueError(f"{flag} must be a number of bytes >= 1, got {size}")
        if allowlist and token is None:
            raise ValueError("--allow-unauthenticated only makes sense with a token")
        metrics_tokens = observe_tokens(token, args.metrics_token_file)
        if args.metrics_port is not None:
            check_observe_host(args.metrics_host, metrics_tokens, args.insecure)
        _check_host(args.host)
        if token is None and not args.insecure and not _is_loopback(args.host):
            raise ValueError(
                f"refusing to listen on {args.host!r} without authentication: anyone who "
                "reaches the port could read and change the store. Give a token "
                "(--token-file FILE or $RDZV_TOKEN; e.g. `openssl rand -hex 32 > FILE`), or "
                "pass --insecure on a trusted network"
            )
    except (RdzvError, ValueError) as exc:
        print(f"rdzv serve: error: {exc}", file=sys.stderr)
        return 2

    observed: list[Any] = []

    def listening(server: StoreServer) -> None:
        for endpoint in server.endpoints:
            print(f"listening on {endpoint}", flush=True)
        if args.metrics_port is not None:
            from rdzv.observe import serve_store

            listener = serve_store(server, args.metrics_host, args.metrics_port, metrics_tokens)
            observed.append(listener)
            print(f"status page on {listener.url} (metrics: {listener.url}metrics)", flush=True)
        mode = "token" if token is not None else "none"
        print(
            f"authentication: {mode}; tls: {'on' if context else 'off'}; "
            f"fast path: {server.fastpath_state}; busy poll: {server.busy_poll_state}",
            flush=True,
        )
        if token is None and _is_loopback(args.host):
            print(
                "only this machine can connect; to open the server to other hosts, give it a "
                "token (--token-file FILE) and --host 0.0.0.0 (see docs/security.md)",
                flush=True,
            )

    try:
        serve(
            args.host,
            args.port,
            on_listening=listening,
            limits=limits,
            allow_extensions=not args.no_extensions,
            data_dir=args.data_dir,
            fsync=args.fsync,
            fsync_interval=args.fsync_interval,
            recovery=args.recover,
            token=token,
            allow_unauthenticated=allowlist,
            ssl=context,
            max_connections=args.max_connections,
            max_waits_per_connection=args.max_waits_per_connection,
            max_wait_keys_per_connection=args.max_wait_keys_per_connection,
            request_timeout=args.request_timeout,
            max_partial_bytes=args.max_partial_bytes,
            max_output_bytes=args.max_output_bytes,
            max_total_output_bytes=args.max_total_output_bytes,
            auth_timeout=args.auth_timeout,
            busy_poll=args.busy_poll_us * 1e-6,
            metrics=args.metrics_port is not None,
            accept_queues=args.accept_queues,
        )
    except (RdzvError, ValueError, OSError) as exc:
        print(f"rdzv serve: error: {exc}", file=sys.stderr)
        return 1
    finally:
        for listener in observed:
            listener.close()
    return 0


def register(subparsers: Any) -> None:
    """Add the ``serve`` sub-command."""
    parser = subparsers.add_parser(
        "serve",
        help="run a TCPStore server (torch.distributed.TCPStore clients can connect)",
        description="Run a TCPStore server, byte-compatible with torch 2.13 clients, until "
        "SIGINT or SIGTERM. Prints 'listening on HOST:PORT' first, then logs connections "
        "and errors.",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on, exactly (default: 127.0.0.1; 0.0.0.0 or :: for every "
        "IPv4/IPv6 interface, which needs a token or --insecure)",
    )
    parser.add_argument(
        "--port", type=_port, default=29500, help="TCP port, 0 for a free one (default: 29500)"
    )
    parser.add_argument(
        "--max-key-bytes",
        type=_positive_int,
        default=8192,
        help="largest key accepted (default: 8192)",
    )
    parser.add_argument(
        "--max-value-bytes",
        type=_positive_int,
        default=8 * 1024 * 1024,
        help="largest value accepted (default: 8 MiB)",
    )
    parser.add_argument(
        "--max-keys",
        type=_positive_int,
        default=128 * 1024,
        help="most keys per request (default: 131072)",
    )
    parser.add_argument(
        "--no-extensions",
        action="store_true",
        help="behave as a plain torch server (no rdzv protocol extensions)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="make the store durable in this directory: recovered at start, every change "
        "written to a log before any reply depends on it (default: in memory only; see "
        "docs/durability.md)",
    )
    parser.add_argument(
        "--fsync",
        choices=("always", "interval", "never"),
        default="always",
        help="with --data-dir: fsync the log at every commit (always: survives power loss), "
        "at most every --fsync-interval (interval: survives a killed server), or leave it "
        "to the OS (never) (default: always)",
    )
    parser.add_argument(
        "--fsync-interval",
        type=float,
        default=0.05,
        help="seconds between fsyncs with --fsync interval (default: 0.05)",
    )
    parser.add_argument(
        "--recover",
        choices=("strict", "discard-corrupt"),
        default="strict",
        help="with --data-dir: when the log or snapshot is damaged beyond a torn last "
        "commit, refuse to start and say what is damaged (strict), or start from what is "
        "intact, logging every dropped record and byte and keeping the damaged files as "
        "*.corrupt (discard-corrupt) (default: strict)",
    )
    parser.add_argument(
        "--max-connections",
        type=_positive_int,
        default=None,
        help="most connections open at once; more are refused (an rdzv client gets an "
        "error naming the limit), logged (default: what the descriptor limit allows: "
        "ulimit -n less 64 and the descriptors open at start)",
    )
    parser.add_argument(
        "--max-waits-per-connection",
        type=_positive_int,
        default=DEFAULT_MAX_WAITS_PER_CONNECTION,
        help="most parked waits (wait, barrier, blocking get) per connection; one more "
        f"closes the connection, logged (default: {DEFAULT_MAX_WAITS_PER_CONNECTION})",
    )
    parser.add_argument(
        "--max-wait-keys-per-connection",
        type=_positive_int,
        default=DEFAULT_MAX_WAIT_KEYS_PER_CONNECTION,
        help="most keys over the parked waits of one connection; past it the connection "
        f"is closed, logged (default: {DEFAULT_MAX_WAIT_KEYS_PER_CONNECTION})",
    )
    parser.add_argument(
        "--request-timeout",
        type=_positive_float,
        default=DEFAULT_REQUEST_TIMEOUT,
        help="seconds a request may take to arrive once its first byte has; a half-sent "
        f"request is then closed, logged (default: {DEFAULT_REQUEST_TIMEOUT:g})",
    )
    parser.add_argument(
        "--max-partial-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_PARTIAL_BYTES,
        help="bytes of half-received requests held over all connections; past it the "
        "connections stalled longest are closed, logged (default: 256 MiB)",
    )
    parser.add_argument(
        "--max-output-bytes",
        type=int,
        default=64 * 1024 * 1024,
        help="replies buffered for one connection past which a client that does not read "
        "them is disconnected, logged; from 4 MiB on, its requests are not read until they "
        "drain (default: 67108864, 64 MiB)",
    )
    parser.add_argument(
        "--max-total-output-bytes",
        type=int,
        default=256 * 1024 * 1024,
        help="replies buffered on the whole server for clients that stopped reading them, "
        "past which the connection that stopped first is disconnected, logged (default: "
        "268435456, 256 MiB)",
    )
    parser.add_argument(
        "--busy-poll-us",
        type=_non_negative_float,
        default=DEFAULT_BUSY_POLL_US,
        help="microseconds to keep polling for requests instead of sleeping after each "
        "read: lower latency for clients doing one request after another, at the price of "
        f"up to one core while requests come that close together; 0: never "
        f"(default: {DEFAULT_BUSY_POLL_US:g})",
    )
    parser.add_argument(
        "--accept-queues",
        type=_positive_int,
        default=DEFAULT_ACCEPT_QUEUES,
        metavar="N",
        help="listening sockets per address, sharing the port (SO_REUSEPORT, Linux): a "
        "storm of up to N x net.core.somaxconn simultaneous connects is accepted without "
        "dropped SYNs, each of which costs its client a 1 s retransmit; 1: one socket "
        f"(default: {DEFAULT_ACCEPT_QUEUES})",
    )
    security = parser.add_argument_group("security (see docs/security.md)")
    security.add_argument(
        "--token-file",
        default=None,
        help="file holding the shared secret clients must prove they know (HMAC "
        "challenge-response; default: $RDZV_TOKEN if set, else no authentication)",
    )
    security.add_argument(
        "--allow-unauthenticated",
        default=None,
        metavar="NETWORKS",
        help="comma-separated networks whose clients may skip authentication, e.g. "
        "127.0.0.0/8,::1 (torch clients cannot authenticate)",
    )
    security.add_argument(
        "--auth-timeout",
        type=_positive_float,
        default=DEFAULT_AUTH_TIMEOUT,
        help="seconds a client has to authenticate before it is disconnected "
        f"(default: {DEFAULT_AUTH_TIMEOUT:g})",
    )
    security.add_argument(
        "--insecure",
        action="store_true",
        help="allow listening on a non-loopback address without a token",
    )
    security.add_argument("--tls-cert", default=None, help="PEM server certificate: serve TLS")
    security.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    security.add_argument(
        "--tls-ca", default=None, help="PEM CA verifying client certificates (if offered)"
    )
    security.add_argument(
        "--tls-require-client-cert",
        action="store_true",
        help="refuse TLS clients without a certificate signed by --tls-ca (mutual TLS)",
    )
    add_observe_arguments(parser, "the store")
    parser.add_argument("--quiet", action="store_true", help="do not log connections")
    parser.set_defaults(func=_serve)
