"""URL rendezvous: ``rendezvous(url, rank, world_size)`` -> ``(store, rank, world_size)``.

The counterpart of ``torch.distributed.rendezvous`` (what ``init_process_group(init_method=
url)`` runs). Built-in schemes:

``tcp://host:port?rank=R&world_size=W``
    A :class:`~rdzv.TCPStore`; rank 0 hosts the server on ``host:port`` and waits until all
    ``W`` ranks have connected, the others connect to it. IPv6 hosts go in brackets
    (``tcp://[::1]:29500``). ``use_libuv`` is accepted and ignored (rdzv has one server).
``env://``
    Same, with ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK`` and ``WORLD_SIZE`` from the
    environment; ``rank``/``world_size`` in the query or as arguments take precedence.
``file:///path?rank=R&world_size=W``
    A :class:`~rdzv.FileStore` on ``path`` (percent-decoded).

For ``tcp://`` and ``env://``, a truthy ``TORCHELASTIC_USE_AGENT_STORE`` (``True``,
``true``, ``1``, ``yes``, ``on``; torch accepts exactly ``"True"``) means a launcher's agent
already hosts the store at ``host:port``: every rank, rank 0 included, connects as a client.
A value that is neither truthy nor falsy (``False``, ``false``, ``0``, ``no``, ``off``, empty)
raises ValueError instead of silently meaning "no".

New schemes are added with :func:`register_rendezvous_handler`. A handler has torch's
contract: ``handler(url: str, **kwargs) -> Iterator[(Store, rank, world_size)]`` where ``url``
already carries the ``rank``/``world_size`` arguments in its query and ``kwargs`` holds
``timeout`` and any extra keyword of :func:`rendezvous`; :func:`parse_url_query` decodes the
query the way the built-in handlers do.

Differences from torch, each on purpose:

* the query is decoded like :func:`urllib.parse.parse_qs` (``%xx`` escapes, ``+``); a bare
  parameter (``?rank``) is a ValueError naming it (torch: IndexError); a parameter repeated
  with different values is a ValueError (torch: the last one wins silently);
* ``rank``/``world_size`` given as arguments while the URL's query already has either of
  them raises, as torch does, with torch's sentence ("The url: ... has node-specific
  arguments(rank, world_size) already."); the error is both an AssertionError (torch's type)
  and a ValueError (it is bad input);
* ranks and world sizes are checked (``world_size >= 1``, ``0 <= rank < world_size``), and
  ``env://`` lists every missing environment variable at once;
* wrong argument types raise TypeError (torch: RuntimeError), an unknown scheme a
  :class:`~rdzv.errors.RendezvousError` (a RuntimeError, like torch's) listing the known
  schemes;
* ``file://`` paths are percent-decoded; ``file://relative/path`` means the relative path
  ``relative/path`` (torch drops ``relative``), ``file://localhost/p`` means ``/p``;
  ``timeout`` applies to the FileStore too (torch leaves it at 300 s until
  ``init_process_group`` changes it).
"""

from __future__ import annotations

import logging
import numbers
import os
import re
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from typing import Any
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from rdzv.errors import RendezvousError
from rdzv.store.base import Store, TimeoutLike, timeout_to_seconds

__all__ = [
    "DEFAULT_PG_TIMEOUT",
    "NodeArgumentsError",
    "RendezvousResult",
    "UrlHandler",
    "parse_url_query",
    "register_rendezvous_handler",
    "registered_schemes",
    "rendezvous",
]

logger = logging.getLogger("rdzv.rendezvous.url")

#: torch's ``default_pg_timeout``: the default ``timeout`` of :func:`rendezvous`.
DEFAULT_PG_TIMEOUT = timedelta(minutes=30)

RendezvousResult = tuple[Store, int, int]
UrlHandler = Callable[..., Iterator[RendezvousResult]]

_handlers: dict[str, UrlHandler] = {}

_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"", "0", "false", "f", "no", "n", "off"})
_TCP_PARAMS = frozenset({"rank", "world_size", "use_libuv"})


def register_rendezvous_handler(scheme: str, handler: UrlHandler) -> None:
    """Register ``handler`` for URLs ``<scheme>://...`` (torch's function of the same name).

    ``scheme`` is case-insensitive (URLs' schemes are) and must be a valid URL scheme
    (a letter, then letters, digits, ``+``, ``-`` or ``.``). Registering the same handler
    twice is a no-op.

    Raises:
        ValueError: ``scheme`` is not a valid URL scheme.
        TypeError: ``handler`` is not callable.
        RuntimeError: another handler is registered for ``scheme`` (torch's text:
            "Rendezvous handler for <scheme>:// already registered").
    """
    if not isinstance(scheme, str) or not _SCHEME_RE.fullmatch(scheme):
        raise ValueError(
            f"invalid rendezvous URL scheme {scheme!r}: a scheme starts with a letter followed "
            "by letters, digits, '+', '-' or '.' (e.g. 'tcp', 'my-store'), without '://'"
        )
    if not callable(handler):
        raise TypeError(f"rendezvous handler for {scheme}:// must be callable, got {handler!r}")
    scheme = scheme.lower()
    current = _handlers.get(scheme)
    if current is not None and current is not handler:
        raise RuntimeError(f"Rendezvous handler for {scheme}:// already registered")
    _handlers[scheme] = handler


def registered_schemes() -> list[str]:
    """The URL schemes :func:`rendezvous` knows, sorted."""
    return sorted(_handlers)


def parse_url_query(url: str) -> dict[str, str]:
    """Decode the query of ``url`` into a dict (``urllib.parse.parse_qs`` decoding).

    Empty pieces (``a=1&&b=2``) are skipped; ``%xx`` escapes and ``+`` are decoded; a value
    may be empty (``a=``). Raises ValueError naming the parameter and the URL for a piece
    without ``=`` (``?rank``) and for a parameter repeated with different values.
    """
    query = _split(url).query
    params: dict[str, str] = {}
    for piece in query.split("&"):
        if not piece:
            continue
        if "=" not in piece:
            name = unquote(piece.replace("+", " "))
            raise ValueError(
                f"URL query parameter {name!r} has no value in {url!r}; write {name}=<value>"
            )
        ((name, value),) = parse_qsl(piece, keep_blank_values=True)
        previous = params.setdefault(name, value)
        if previous != value:
            raise ValueError(
                f"URL query parameter {name!r} is given twice with different values "
                f"({previous!r} and {value!r}) in {url!r}; give it once"
            )
    return params


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {type(value).__name__}: {value!r}")
    return int(value)


def rendezvous(
    url: str | bytes,
    rank: int = -1,
    world_size: int = -1,
    timeout: TimeoutLike = DEFAULT_PG_TIMEOUT,
    **kwargs: Any,
) -> Iterator[RendezvousResult]:
    """Meet the other ranks through ``url``; yields ``(store, rank, world_size)`` once.

    Same contract as ``torch.distributed.rendezvous`` (see the module docstring for the URL
    forms and the differences). The returned iterator yields exactly once; a second
    ``next()`` raises :class:`~rdzv.errors.RendezvousError` (URL rendezvous cannot
    re-rendezvous; use an elastic handler for that).

    Args:
        url: ``<scheme>://...``, ``str`` or UTF-8 ``bytes``.
        rank: this process's rank, or -1 to take it from the URL (or the environment for
            ``env://``); written into the URL's query before the handler runs.
        world_size: the number of ranks, or -1 likewise.
        timeout: ``timedelta`` or seconds; the store's default timeout, which also bounds
            connecting and, on rank 0, waiting for all ranks (default 30 minutes, torch's
            ``default_pg_timeout``).
        **kwargs: passed to the scheme's handler.

    Raises:
        TypeError: ``url`` is not str/bytes, ``rank``/``world_size`` are not integers, or
            ``timeout`` is not a timedelta or number.
        ValueError: ``rank``/``world_size`` conflict with the URL's query, or the handler
            finds parameters missing or invalid ("Error initializing rdzv using tcp://
            rendezvous: ...").
        RendezvousError: no handler for the URL's scheme (the message lists the known ones).

        The URL is validated here; the store is created by the first ``next()``, which
        raises the store's errors (connection refused, timeouts: see :class:`~rdzv.TCPStore`
        and :class:`~rdzv.FileStore`).
    """
    if isinstance(url, bytes):
        url = url.decode("utf-8")
    if not isinstance(url, str):
        raise TypeError(f"`url` must be a string, got {type(url).__name__}: {url!r}")
    rank = _check_int("rank", rank)
    world_size = _check_int("world_size", world_size)
    timeout_to_seconds(timeout)

    parts = _split(url)
    handler = _handlers.get(parts.scheme)
    if handler is None:
        shown = f"{parts.scheme}://" if parts.scheme else "(no scheme)"
        known = ", ".join(f"{s}://" for s in registered_schemes()) or "none"
        raise RendezvousError(
            f"No rendezvous handler for {shown} in {url!r}; known schemes: {known}. "
            "Register new ones with rdzv.register_rendezvous_handler()."
        )
    if rank != -1 or world_size != -1:
        url = _with_arguments(url, parts, rank, world_size)
    return handler(url, timeout=timeout, **kwargs)


class NodeArgumentsError(ValueError, AssertionError):
    """``rank``/``world_size`` given both in the URL's query and as arguments (torch raises
    AssertionError; this is also a ValueError)."""


def _with_arguments(url: str, parts: SplitResult, rank: int, world_size: int) -> str:
    """``url`` with ``rank``/``world_size`` (those != -1) in its query; NodeArgumentsError
    when the query already holds either (torch's rule)."""
    query = parse_url_query(url)
    given = [name for name in ("rank", "world_size") if name in query]
    if given:
        raise NodeArgumentsError(
            f"The url: {url} has node-specific arguments(rank, world_size) already. "
            f"(It has {', '.join(given)}; pass rank/world_size either in the URL or as "
            "arguments, not both.)"
        )
    for name, value in (("rank", rank), ("world_size", world_size)):
        if value != -1:
            query[name] = str(value)
    return urlunsplit(parts._replace(query=urlencode(query)))


def _split(url: str) -> SplitResult:
    """``urlsplit(url)``, with a ValueError that says what is wrong and how to write it."""
    try:
        return urlsplit(url)
    except ValueError as exc:
        hint = (
            "an IPv6 address goes in brackets, closed before the port and the query, e.g. "
            "tcp://[::1]:29500?rank=0"
            if "[" in url or "]" in url
            else "expected scheme://host:port?name=value&..."
        )
        raise ValueError(f"malformed rendezvous URL {url!r} ({exc}): {hint}") from None


# --------------------------------------------------------------------------- built-in schemes
def _error(scheme: str, message: str) -> ValueError:
    return ValueError(f"Error initializing rdzv using {scheme}:// rendezvous: {message}")


def _yield_once(
    scheme: str, make_store: Callable[[], Store], rank: int, world_size: int
) -> Iterator[RendezvousResult]:
    """Create the store on the first ``next()`` (as torch's generator handlers do) and yield
    it once; the URL was validated before."""
    yield make_store(), rank, world_size
    raise RendezvousError(
        f"Unable to perform re-rendezvous using {scheme}:// method: a URL rendezvous yields "
        "once; use an elastic rendezvous handler (rdzv.rendezvous.registry) to re-rendezvous"
    )


def _parse_int(scheme: str, name: str, text: str, source: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _error(scheme, f"{name} must be an integer, got {text!r} ({source})") from None


def _check_rank_world(scheme: str, rank: int, world_size: int) -> None:
    if world_size < 1:
        raise _error(scheme, f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise _error(scheme, f"rank must be in [0, world_size) = [0, {world_size}), got {rank}")


def _rank_and_world_from_query(scheme: str, query: Mapping[str, str]) -> tuple[int, int]:
    missing = [
        f"{label} parameter missing"
        for name, label in (("rank", "rank"), ("world_size", "world size"))
        if name not in query
    ]
    if missing:
        raise _error(
            scheme,
            f"{' and '.join(missing)}: add ?rank=<r>&world_size=<n> to the URL or pass "
            "rank= and world_size= to rendezvous()",
        )
    rank = _parse_int(scheme, "rank", query["rank"], "URL query")
    world_size = _parse_int(scheme, "world_size", query["world_size"], "URL query")
    _check_rank_world(scheme, rank, world_size)
    return rank, world_size


def _use_agent_store() -> bool:
    raw = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "")
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"environment variable TORCHELASTIC_USE_AGENT_STORE={raw!r} is not a boolean; "
        "use True/true/1 or False/false/0"
    )


def _warn_unknown(scheme: str, query: Mapping[str, str]) -> None:
    unknown = sorted(set(query) - _TCP_PARAMS)
    if unknown:
        logger.warning(
            "%s:// rendezvous ignores unknown URL parameters %s (known: %s)",
            scheme,
            ", ".join(unknown),
            ", ".join(sorted(_TCP_PARAMS)),
        )


def _tcp_store_factory(
    scheme: str, host: str, port: int, rank: int, world_size: int, timeout: TimeoutLike
) -> Callable[[], Store]:
    """Validate and return the maker of the tcp:// / env:// store (torch's
    ``_create_c10d_store``)."""
    if not 0 <= port <= 65535:
        raise _error(scheme, f"port must have value from 0 to 65535 but was {port}.")
    agent_store = _use_agent_store()
    if port == 0 and (rank != 0 or agent_store):
        raise _error(
            scheme,
            f"port 0 (an ephemeral port chosen by the server) cannot be reached by rank {rank};"
            " give the port the server listens on",
        )

    def make_store() -> Store:
        import rdzv

        if agent_store:
            # A launcher's agent hosts the store: every rank is a client.
            client: Store = rdzv.TCPStore(host, port, world_size, False, timeout)
            return client
        store: Store = rdzv.TCPStore(host, port, world_size, rank == 0, timeout, multi_tenant=True)
        return store

    return make_store


def _tcp_handler(
    url: str, timeout: TimeoutLike = DEFAULT_PG_TIMEOUT, **kwargs: Any
) -> Iterator[RendezvousResult]:
    parts = _split(url)
    query = parse_url_query(url)
    if "[" not in parts.netloc and parts.netloc.count(":") >= 2:
        raise _error(
            "tcp",
            f"IPv6 addresses must be in brackets in {url!r}, e.g. tcp://[::1]:29500",
        )
    try:
        port = parts.port
    except ValueError as exc:
        raise _error("tcp", f"invalid port in {url!r}: {exc}") from None
    if port is None:
        raise _error("tcp", f"port number missing in {url!r}: write tcp://<host>:<port>")
    host = parts.hostname
    if not host:
        raise _error("tcp", f"host name missing in {url!r}: write tcp://<host>:<port>")
    rank, world_size = _rank_and_world_from_query("tcp", query)
    _warn_unknown("tcp", query)
    make_store = _tcp_store_factory("tcp", host, port, rank, world_size, timeout)
    return _yield_once("tcp", make_store, rank, world_size)


def _env_handler(
    url: str, timeout: TimeoutLike = DEFAULT_PG_TIMEOUT, **kwargs: Any
) -> Iterator[RendezvousResult]:
    query = parse_url_query(url)
    sources = {"RANK": "rank", "WORLD_SIZE": "world_size", "MASTER_ADDR": "", "MASTER_PORT": ""}
    values: dict[str, tuple[str, str]] = {}
    missing: list[str] = []
    for var, param in sources.items():
        if param and param in query:
            values[var] = (query[param], "URL query")
        elif os.environ.get(var):
            values[var] = (os.environ[var], f"environment variable {var}")
        else:
            missing.append(var)
    if missing:
        names = ", ".join(missing)
        verb = "is" if len(missing) == 1 else "are"
        raise _error(
            "env",
            f"environment variable{'s' if len(missing) > 1 else ''} {names} expected, but "
            f"{verb} not set (rank and world_size may also come from the URL query or the "
            "rendezvous() arguments)",
        )
    rank = _parse_int("env", "rank", *values["RANK"])
    world_size = _parse_int("env", "world_size", *values["WORLD_SIZE"])
    port = _parse_int("env", "MASTER_PORT", *values["MASTER_PORT"])
    _check_rank_world("env", rank, world_size)
    host = values["MASTER_ADDR"][0].strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    _warn_unknown("env", query)
    make_store = _tcp_store_factory("env", host, port, rank, world_size, timeout)
    return _yield_once("env", make_store, rank, world_size)


def _file_path(parts: SplitResult) -> str:
    netloc = unquote(parts.netloc)
    path = unquote(parts.path)
    if netloc in ("", "localhost"):
        return path
    # file://relative/path: what follows "file://" is the path.
    return netloc + path


def _file_handler(
    url: str, timeout: TimeoutLike = DEFAULT_PG_TIMEOUT, **kwargs: Any
) -> Iterator[RendezvousResult]:
    parts = _split(url)
    path = _file_path(parts)
    if not path:
        raise _error("file", f"path missing in {url!r}: write file:///<absolute path>")
    query = parse_url_query(url)
    rank, world_size = _rank_and_world_from_query("file", query)

    def make_store() -> Store:
        import rdzv

        store: Store = rdzv.FileStore(path, world_size, timeout=timeout)
        return store

    return _yield_once("file", make_store, rank, world_size)


register_rendezvous_handler("tcp", _tcp_handler)
register_rendezvous_handler("env", _env_handler)
register_rendezvous_handler("file", _file_handler)
