"""Command-line options of the metrics and status listener, shared by ``rdzv serve`` and
``rdzv run`` (``--metrics-port``, ``--metrics-host``, ``--metrics-token-file``)."""

from __future__ import annotations

import argparse
import ipaddress
import socket

from rdzv.auth import load_token

__all__ = ["add_observe_arguments", "check_observe_host", "is_loopback", "observe_tokens"]


def add_observe_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """Add the listener's options to ``parser``; ``what`` names the observed thing."""
    group = parser.add_argument_group("metrics and status page (see docs/observability.md)")
    group.add_argument(
        "--metrics-port",
        "--metrics_port",
        type=int,
        default=None,
        help=f"serve Prometheus metrics of {what} at /metrics and a live status page at / "
        "on this port (0: a free one; needs the 'metrics' extra; default: off)",
    )
    group.add_argument(
        "--metrics-host",
        "--metrics_host",
        default="127.0.0.1",
        help="address of the metrics listener (default 127.0.0.1; another address needs a "
        "token, or --insecure)",
    )
    group.add_argument(
        "--metrics-token-file",
        "--metrics_token_file",
        default=None,
        help="file holding a read-only token that /metrics and the status page accept "
        "besides the store's token ('Authorization: Bearer <token>')",
    )


def observe_tokens(store_token: bytes | None, token_file: str | None) -> list[bytes]:
    """The bearer tokens the listener accepts: the store's and the read-only one. Raises
    :class:`~rdzv.errors.AuthError` when the file cannot be read or is too short."""
    tokens = [store_token] if store_token is not None else []
    if token_file is not None:
        read_only = load_token(None, token_file, use_env=False)
        if read_only is not None:
            tokens.append(read_only)
    return tokens


def is_loopback(host: str) -> bool:
    """True if every address ``host`` resolves to is a loopback address ("" is not)."""
    if host == "":
        return False
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(str(i[4][0]).split("%", 1)[0]).is_loopback for i in infos)


def check_observe_host(host: str, tokens: list[bytes], insecure: bool) -> None:
    """Raise ValueError when the listener would be reachable from other hosts without a
    token (unless ``insecure``), or when ``prometheus_client`` is not installed."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        from rdzv.observe import MISSING_EXTRA

        raise ValueError(f"--metrics-port: {MISSING_EXTRA}") from None
    if not tokens and not insecure and not is_loopback(host):
        raise ValueError(
            f"refusing to serve metrics and the status page on {host!r} without a token: "
            "give the store a token or --metrics-token-file FILE, or pass --insecure on a "
            "trusted network"
        )
