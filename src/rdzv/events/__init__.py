"""Events: what the rendezvous and the launcher did, when, and how long it took.

Types with torch's names and JSON shapes (``torch.distributed.elastic.events``):
:class:`EventSource`, :class:`NodeState`, :class:`Event`, :class:`RdzvEvent`; plus
:func:`record`, :func:`record_rdzv_event` and the cheap :func:`record_rdzv_event_fields`.

Unlike torch, events are always on and cost almost nothing when nobody listens: recording
checks one list and returns. Listeners are *destinations*:

==================  ==========================================================
``null``            drop (the default)
``console``         one JSON line per event on stderr
``logging``         ``logging.getLogger("rdzv.events").info(json)``
``jsonl:PATH``      append one JSON line per event to ``PATH`` (thread-safe)
==================  ==========================================================

plus Python callbacks (:func:`add_callback`). The active destinations are set with
:func:`set_destinations` or, at import, from the environment variable ``RDZV_EVENTS``
(comma-separated, e.g. ``RDZV_EVENTS=console,jsonl:/tmp/rdzv-events.jsonl``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, TextIO

__all__ = [
    "ENV_VAR",
    "Event",
    "EventHandler",
    "EventMetadataValue",
    "EventSource",
    "NodeState",
    "RdzvEvent",
    "add_callback",
    "construct_and_record_rdzv_event",
    "get_destinations",
    "get_logging_handler",
    "is_enabled",
    "make_handler",
    "record",
    "record_rdzv_event",
    "record_rdzv_event_fields",
    "set_destinations",
]

#: Environment variable read at import: comma-separated destinations.
ENV_VAR = "RDZV_EVENTS"

EventMetadataValue = str | int | float | bool | None

_log = logging.getLogger("rdzv.events")


class EventSource(str, Enum):
    """Who emitted an event (torch's ``EventSource``)."""

    AGENT = "AGENT"
    WORKER = "WORKER"


class NodeState(str, Enum):
    """State of a node when a rendezvous event was emitted (torch's ``NodeState``)."""

    INIT = "INIT"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _load_json_object(data: str, what: str, enum_field: str, enum: type[Enum]) -> dict[str, Any]:
    """Parse a serialized event: a JSON object whose ``enum_field`` holds an enum *name*.

    Raises ValueError for malformed JSON or a non-object, KeyError for an unknown name.
    """
    raw = json.loads(data)
    if not isinstance(raw, dict):
        raise ValueError(f"an {what} must be a JSON object, got {type(raw).__name__}")
    raw[enum_field] = enum[raw[enum_field]]
    return raw


class _Serializable:
    """``serialize()`` = JSON of the dataclass fields (enums by value = name); ``str()`` too."""

    def serialize(self) -> str:
        return json.dumps(asdict(self))  # type: ignore[call-overload]

    def __str__(self) -> str:
        return self.serialize()


@dataclass
class Event(_Serializable):
    """A generic event (torch's ``Event``). ``timestamp`` is in milliseconds since the epoch;
    :func:`record` fills it when left at 0 (torch never fills it)."""

    name: str
    source: EventSource
    timestamp: int = 0
    metadata: dict[str, EventMetadataValue] = field(default_factory=dict)

    @staticmethod
    def deserialize(data: str | Event) -> Event:
        """Parse :meth:`serialize` output (torch's JSON shape: ``{"name", "source",
        "timestamp", "metadata"}``); an Event is returned unchanged.

        Raises ValueError on malformed JSON, KeyError on an unknown source.
        """
        if isinstance(data, Event):
            return data
        return Event(**_load_json_object(data, "Event", "source", EventSource))


@dataclass
class RdzvEvent(_Serializable):
    """A rendezvous event (torch's ``RdzvEvent`` plus ``duration_ms`` and ``timestamp``).

    ``duration_ms``: how long the step took, in milliseconds (None if not a timed step).
    ``timestamp``: milliseconds since the epoch, filled by the recorder when 0.
    """

    name: str
    run_id: str
    message: str
    hostname: str
    pid: int
    node_state: NodeState
    master_endpoint: str = ""
    rank: int | None = None
    local_id: int | None = None
    error_trace: str = ""
    duration_ms: float | None = None
    timestamp: int = 0

    @staticmethod
    def deserialize(data: str | RdzvEvent) -> RdzvEvent:
        """Parse :meth:`serialize` output (every field, ``node_state`` by name); an
        RdzvEvent is returned unchanged.

        Raises ValueError on malformed JSON, KeyError on an unknown node state.
        """
        if isinstance(data, RdzvEvent):
            return data
        return RdzvEvent(**_load_json_object(data, "RdzvEvent", "node_state", NodeState))


AnyEvent = Event | RdzvEvent
#: A destination: called with each event, must not block for long and must not raise.
EventHandler = Callable[[AnyEvent], None]


class _JsonLinesFile:
    """Appends one JSON line per event to a file; opened lazily, shared by threads."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file: TextIO | None = None

    def __call__(self, event: AnyEvent) -> None:
        line = event.serialize() + "\n"
        with self._lock:
            if self._file is None:
                self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            self._file.write(line)
            self._file.flush()

    def __repr__(self) -> str:
        return f"jsonl:{self.path}"


def _console(event: AnyEvent) -> None:
    print(event.serialize(), file=sys.stderr, flush=True)


def _logging(event: AnyEvent) -> None:
    _log.info("%s", event.serialize())


def make_handler(spec: str) -> EventHandler | None:
    """The handler for a destination spec (``null``, ``console``, ``logging``,
    ``jsonl:PATH``); None for ``null``. Raises ValueError for anything else."""
    spec = spec.strip()
    if spec in ("", "null"):
        return None
    if spec == "console":
        return _console
    if spec == "logging":
        return _logging
    if spec.startswith("jsonl:") and len(spec) > len("jsonl:"):
        return _JsonLinesFile(os.path.expanduser(spec[len("jsonl:") :]))
    raise ValueError(
        f"unknown event destination {spec!r}; use null, console, logging or jsonl:PATH "
        f"(comma-separated in ${ENV_VAR})"
    )


class _Registry:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.specs: list[str] = []
        # Copy-on-write tuple: recording reads it without taking the lock.
        self.handlers: tuple[EventHandler, ...] = ()
        self.callbacks: tuple[EventHandler, ...] = ()
        self.active: tuple[EventHandler, ...] = ()

    def refresh(self) -> None:
        self.active = self.handlers + self.callbacks


_registry = _Registry()


def set_destinations(specs: str | Iterable[str] | None) -> None:
    """Replace the active destinations (callbacks stay). A string is split on commas;
    None or ``"null"`` disables them. Raises ValueError for an unknown destination (and
    changes nothing then)."""
    if specs is None:
        parts: list[str] = []
    elif isinstance(specs, str):
        parts = [p for p in (s.strip() for s in specs.split(",")) if p]
    else:
        parts = [p.strip() for p in specs if p.strip()]
    handlers = tuple(h for h in (make_handler(p) for p in parts) if h is not None)
    with _registry.lock:
        _registry.specs = parts
        _registry.handlers = handlers
        _registry.refresh()


def get_destinations() -> list[str]:
    """The active destination specs."""
    return list(_registry.specs)


def add_callback(callback: EventHandler) -> Callable[[], None]:
    """Call ``callback(event)`` for every recorded event; returns a function that removes it."""
    with _registry.lock:
        _registry.callbacks = (*_registry.callbacks, callback)
        _registry.refresh()

    def remove() -> None:
        with _registry.lock:
            _registry.callbacks = tuple(c for c in _registry.callbacks if c is not callback)
            _registry.refresh()

    return remove


def is_enabled() -> bool:
    """True when at least one destination or callback listens."""
    return bool(_registry.active)


def _dispatch(event: AnyEvent, handlers: tuple[EventHandler, ...]) -> None:
    for handler in handlers:
        try:
            handler(event)
        except Exception:  # a broken listener must never break a rendezvous
            _log.exception("event handler %r failed", handler)


def record(event: Event, destination: str | None = None) -> None:
    """Record ``event`` to ``destination`` (a spec as in :func:`make_handler`, torch style)
    or, when None, to the active destinations and callbacks. Fills ``timestamp`` if 0."""
    if event.timestamp == 0:
        event.timestamp = _now_ms()
    if destination is None:
        _dispatch(event, _registry.active)
        return
    handler = make_handler(destination)
    _dispatch(event, _registry.callbacks if handler is None else (handler, *_registry.callbacks))


def record_rdzv_event(event: RdzvEvent) -> None:
    """Record a rendezvous event to the active destinations and callbacks."""
    if event.timestamp == 0:
        event.timestamp = _now_ms()
    _dispatch(event, _registry.active)


_hostname: str | None = None


def _host() -> str:
    global _hostname
    if _hostname is None:
        _hostname = socket.getfqdn()
    return _hostname


def record_rdzv_event_fields(
    name: str,
    run_id: str,
    message: str,
    node_state: NodeState,
    *,
    rank: int | None = None,
    local_id: int | None = None,
    master_endpoint: str = "",
    duration_ms: float | None = None,
) -> None:
    """Build and record an :class:`RdzvEvent`; a no-op costing one check when nobody listens.

    Hostname and pid are filled in; for ``NodeState.FAILED`` the traceback of the exception
    being handled (if any) becomes ``error_trace``.
    """
    handlers = _registry.active
    if not handlers:
        return
    trace = ""
    if node_state is NodeState.FAILED and sys.exc_info()[0] is not None:
        trace = traceback.format_exc()
    event = RdzvEvent(
        name=name,
        run_id=run_id,
        message=message,
        hostname=_host(),
        pid=os.getpid(),
        node_state=node_state,
        master_endpoint=master_endpoint,
        rank=rank,
        local_id=local_id,
        error_trace=trace,
        duration_ms=duration_ms,
        timestamp=_now_ms(),
    )
    _dispatch(event, handlers)


class _DestinationsHandler(logging.Handler):
    """A logging handler that forwards records (their message, as an :class:`Event` named
    by the logger) to the active destinations and callbacks."""

    def emit(self, record: logging.LogRecord) -> None:
        event = Event(name=record.name, source=EventSource.AGENT, metadata={})
        event.metadata["message"] = record.getMessage()
        _dispatch(event, _registry.active)


_console_log_handler = logging.StreamHandler()
_null_log_handler = logging.NullHandler()
_destinations_log_handler = _DestinationsHandler()


def get_logging_handler(destination: str = "null") -> logging.Handler:
    """torch's ``get_logging_handler``: the :class:`logging.Handler` of ``destination``.

    ``"null"``: a :class:`logging.NullHandler`; ``"console"``: a
    :class:`logging.StreamHandler` (stderr); ``"dynamic_rendezvous"`` (the one torch's
    rendezvous consults): a handler forwarding to rdzv's active destinations and callbacks
    while any listens, else a NullHandler (nothing listens: recording is skipped, as in
    torch). Raises KeyError for another name, as torch does.
    """
    if destination == "dynamic_rendezvous":
        return _destinations_log_handler if _registry.active else _null_log_handler
    handlers: dict[str, logging.Handler] = {
        "console": _console_log_handler,
        "null": _null_log_handler,
    }
    return handlers[destination]


def _get_or_create_logger(destination: str = "null") -> logging.Logger:
    """torch's helper: the logger ``rdzv.events.{destination}``, whose only handler is
    :func:`get_logging_handler` of ``destination`` (not propagated)."""
    logger = logging.getLogger(f"rdzv.events.{destination}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.handlers = [get_logging_handler(destination)]
    return logger


def construct_and_record_rdzv_event(
    run_id: str,
    message: str,
    node_state: NodeState,
    name: str = "",
    hostname: str = "",
    pid: int | None = None,
    master_endpoint: str = "",
    local_id: int | None = None,
    rank: int | None = None,
) -> None:
    """Build a :class:`RdzvEvent` and record it with :func:`record_rdzv_event`; same
    signature and behaviour as torch's function of the same name.

    Does nothing when ``get_logging_handler("dynamic_rendezvous")`` is a NullHandler (no
    destination or callback listens). ``hostname`` defaults to this host's FQDN, ``pid``
    to this process id, ``name`` to the calling function's name; the event's name is
    ``"{caller's file name}:{name}"`` as torch writes it. For ``NodeState.FAILED`` the
    traceback of the exception being handled becomes ``error_trace``.
    """
    if isinstance(get_logging_handler("dynamic_rendezvous"), logging.NullHandler):
        return
    caller = sys._getframe(1)
    filename = os.path.basename(caller.f_code.co_filename)
    event = RdzvEvent(
        name=f"{filename}:{name or caller.f_code.co_name}",
        run_id=run_id,
        message=message,
        hostname=hostname or _host(),
        pid=pid or os.getpid(),
        node_state=node_state,
        master_endpoint=master_endpoint,
        rank=rank,
        local_id=local_id,
        error_trace=traceback.format_exc() if node_state == NodeState.FAILED else "",
    )
    del caller
    record_rdzv_event(event)


def _configure_from_env() -> None:
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return
    try:
        set_destinations(spec)
    except ValueError as exc:
        _log.warning("ignoring $%s: %s", ENV_VAR, exc)


_configure_from_env()
