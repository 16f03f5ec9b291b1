"""``rdzv store``: inspect and edit a TCPStore (rdzv's or torch's server) from the shell."""

from __future__ import annotations

import argparse
import base64
import json
import sys
from typing import Any

from rdzv.endpoint import parse_endpoint
from rdzv.errors import RdzvError

__all__ = ["register"]


def _value_json(value: bytes) -> dict[str, Any]:
    try:
        return {"value": value.decode("utf-8")}
    except UnicodeDecodeError:
        return {"value_base64": base64.b64encode(value).decode("ascii")}


def _value_text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return repr(value)


def _printable(key: str) -> str:
    """``key`` safe for a terminal: bytes that are not UTF-8 as ``\\xNN`` and every
    non-printable character (escape sequences, tabs, newlines) as a Python escape."""
    text = key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


def _run(args: argparse.Namespace) -> int:
    from rdzv.store.tcp import TCPStore

    try:
        host, port = parse_endpoint(args.endpoint)
    except ValueError as exc:
        print(f"rdzv store: error: {exc}", file=sys.stderr)
        return 2
    try:
        with TCPStore(host, port, timeout=args.timeout) as store:
            result = _execute(store, args)
    except (RdzvError, ValueError, TypeError) as exc:
        print(f"rdzv store: error: {exc}", file=sys.stderr)
        return 1
    text = result.pop("text")
    if args.json:
        print(json.dumps(result))
    elif text is not None:
        print(text)
    return 0


def _execute(store: Any, args: argparse.Namespace) -> dict[str, Any]:
    action = args.action
    if action == "get":
        value: bytes = store.get(args.key)
        return {"key": args.key, **_value_json(value), "text": _value_text(value)}
    if action == "set":
        store.set(args.key, args.value)
        return {"key": args.key, "ok": True, "text": None}
    if action == "add":
        total = store.add(args.key, args.amount)
        return {"key": args.key, "value": total, "text": str(total)}
    if action == "delete":
        deleted = store.delete_key(args.key)
        return {"key": args.key, "deleted": deleted, "text": "deleted" if deleted else "absent"}
    if action == "keys":
        entries = sorted(store.list_key_sizes(args.prefix))
        lines = [f"{_printable(key)}\t{size}" for key, size in entries]
        listed = [{"key": key, "size": size} for key, size in entries]
        return {"keys": listed, "text": "\n".join(lines) if lines else None}
    if action == "num-keys":
        count = store.num_keys()
        return {"num_keys": count, "text": str(count)}
    if action == "wait":
        store.wait(args.keys, args.timeout)
        return {"keys": args.keys, "ok": True, "text": None}
    raise AssertionError(action)


def register(subparsers: Any) -> None:
    """Add the ``store`` sub-command."""
    parser = subparsers.add_parser(
        "store",
        help="get/set/add/delete/list keys of a TCPStore server",
        description="Talk to a TCPStore server (rdzv serve, or torch's). Keys are the user "
        "keys a torch TCPStore client sees (without the internal '/' prefix).",
    )
    parser.add_argument(
        "--endpoint", default="127.0.0.1:29500", help="HOST:PORT (default: 127.0.0.1:29500)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds to connect and to wait for keys (default: 10)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    get = actions.add_parser("get", help="print the value of KEY (waits up to --timeout)")
    get.add_argument("key")
    put = actions.add_parser("set", help="set KEY to VALUE (UTF-8)")
    put.add_argument("key")
    put.add_argument("value")
    add = actions.add_parser("add", help="add AMOUNT to the counter KEY, print the new value")
    add.add_argument("key")
    add.add_argument("amount", type=int)
    delete = actions.add_parser("delete", help="delete KEY")
    delete.add_argument("key")
    keys = actions.add_parser("keys", help="list keys (starting with PREFIX) and value sizes")
    keys.add_argument("prefix", nargs="?", default="")
    actions.add_parser("num-keys", help="print the number of keys")
    wait = actions.add_parser("wait", help="wait until every KEY exists (up to --timeout)")
    wait.add_argument("keys", nargs="+")
    parser.set_defaults(func=_run)
