"""``rdzv status``: the live state of a dynamic rendezvous (``c10d`` backend) as a table.

Reads, never writes (see :mod:`rdzv.launcher.status`): the latest complete round with its
members (rank, slot, address, agent pid, workers, heartbeat and its age), the nodes waiting
for the next round, and whether the rendezvous is closed. ``--json`` prints one JSON object;
``--watch`` refreshes every ``--interval`` seconds until interrupted.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

__all__ = ["register"]

#: The c10d rendezvous's default port (torch's).
_DEFAULT_PORT = 29400


def register(subparsers: Any) -> None:
    """Add the ``status`` sub-command."""
    p = subparsers.add_parser(
        "status",
        help="show the live state of a rendezvous (round, members, waiting nodes, heartbeats)",
        description="Show the state of a dynamic rendezvous kept in a TCPStore (the c10d "
        "backend of rdzv run). Read-only.",
    )
    p.add_argument(
        "--endpoint", required=True, help="the rendezvous endpoint HOST[:PORT] (default port 29400)"
    )
    p.add_argument("--run-id", "--rdzv-id", dest="run_id", required=True, help="the run id")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--web",
        action="store_true",
        help="print the URLs of the agents' status pages (rdzv run --metrics-port)",
    )
    p.add_argument("--watch", action="store_true", help="refresh until interrupted")
    p.add_argument(
        "--interval", type=float, default=2.0, help="seconds between refreshes (default 2)"
    )
    p.add_argument(
        "--sample",
        type=float,
        default=6.0,
        help="seconds to watch the heartbeat counters for their ages (default 6, a bit more than "
        "the default keep-alive interval; stops as soon as every live one moved; 0: no ages)",
    )
    p.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to connect and read (default 10)"
    )
    p.set_defaults(func=_status)


def _unknown_run(store: Any, run_id: str) -> str:
    """Why ``run_id`` shows nothing: no key of it in the store; names the runs there."""
    runs = sorted({k.split("/")[1] for k, _ in store.list_key_sizes("rdzv/") if k.count("/") >= 2})
    known = ", ".join(repr(r) for r in runs[:20]) + (" ..." if len(runs) > 20 else "")
    return (
        f"no rendezvous with run id {run_id!r} in this store"
        + (f" (run ids here: {known})" if runs else " (it holds no rendezvous)")
        + "; check --run-id (the --rdzv-id of rdzv run) and the endpoint, or use --watch to "
        "wait for it to start"
    )


def _status(args: argparse.Namespace) -> int:
    from rdzv.errors import RdzvError
    from rdzv.launcher.status import (
        HeartbeatClock,
        measure_ages,
        read_status,
        render_json,
        render_table,
        render_web,
    )
    from rdzv.rendezvous.utils import parse_rendezvous_endpoint
    from rdzv.store.tcp import TCPStore

    try:
        host, port = parse_rendezvous_endpoint(args.endpoint, _DEFAULT_PORT)
    except ValueError as exc:
        print(f"rdzv status: {exc}", file=sys.stderr)
        return 2
    endpoint = f"{host}:{port}"
    clock = HeartbeatClock()
    try:
        store = TCPStore(host, port, is_master=False, timeout=args.timeout)
        while True:
            status = read_status(store, args.run_id, endpoint)
            unknown = not (status.closed or status.open_round or status.waiting)
            if unknown and not args.watch:
                print(
                    f"rdzv status: {endpoint}: {_unknown_run(store, args.run_id)}", file=sys.stderr
                )
                return 1
            if args.web:
                print(render_web(status), flush=True)
                return 0 if any(s.web for s in status.members) else 1
            if args.sample > 0 or args.watch:
                measure_ages(store, status, clock, sample=0.0 if args.watch else args.sample)
            text = render_json(status) if args.json else render_table(status)
            if args.watch and not args.json and sys.stdout.isatty():
                sys.stdout.write("\x1b[H\x1b[2J")
            print(text, flush=True)
            if not args.watch:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
    except (RdzvError, OSError) as exc:
        print(f"rdzv status: {endpoint}: {exc}", file=sys.stderr)
        return 1
