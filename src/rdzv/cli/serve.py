"""``rdzv serve``: run a standalone TCPStore server (torch-compatible) until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from rdzv.errors import RdzvError

__all__ = ["register"]


def _serve(args: argparse.Namespace) -> int:
    from rdzv.server import StoreServer, serve
    from rdzv.wire import Limits

    if args.log_level == "WARNING" and not args.quiet:
        # Connections and errors are what an operator of a standalone server wants to see.
        logging.getLogger("rdzv.server").setLevel(logging.INFO)
    limits = Limits(
        max_key_bytes=args.max_key_bytes,
        max_value_bytes=args.max_value_bytes,
        max_keys=args.max_keys,
    )

    def listening(server: StoreServer) -> None:
        for endpoint in server.endpoints:
            print(f"listening on {endpoint}", flush=True)

    try:
        serve(
            args.host,
            args.port,
            on_listening=listening,
            limits=limits,
            allow_extensions=not args.no_extensions,
        )
    except (RdzvError, ValueError, OSError) as exc:
        print(f"rdzv serve: error: {exc}", file=sys.stderr)
        return 1
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
        "IPv4/IPv6 interface)",
    )
    parser.add_argument(
        "--port", type=int, default=29500, help="TCP port, 0 for a free one (default: 29500)"
    )
    parser.add_argument(
        "--max-key-bytes", type=int, default=8192, help="largest key accepted (default: 8192)"
    )
    parser.add_argument(
        "--max-value-bytes",
        type=int,
        default=8 * 1024 * 1024,
        help="largest value accepted (default: 8 MiB)",
    )
    parser.add_argument(
        "--max-keys", type=int, default=128 * 1024, help="most keys per request (default: 131072)"
    )
    parser.add_argument(
        "--no-extensions",
        action="store_true",
        help="behave as a plain torch server (no rdzv protocol extensions)",
    )
    parser.add_argument("--quiet", action="store_true", help="do not log connections")
    parser.set_defaults(func=_serve)
