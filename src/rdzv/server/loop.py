"""Process helpers of the server: the loop it runs on (uvloop when installed), the
descriptor limit it raises (a server holds one descriptor per client) and the garbage
collector's settings of a process that serves."""

from __future__ import annotations

import asyncio
import gc
import logging

__all__ = [
    "GC_OBJECTS_PER_CONNECTION",
    "GC_YOUNG_THRESHOLD",
    "gc_follow_connections",
    "new_event_loop",
    "raise_fd_limit",
    "tune_gc",
]

logger = logging.getLogger("rdzv.server")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's when uvloop is installed (the ``fast`` extra), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def raise_fd_limit() -> tuple[int, int] | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (a server holds one fd per client).

    Returns the (soft, hard) limits now in force, or None where ``resource`` is unavailable.
    """
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logger.debug("could not raise RLIMIT_NOFILE to %s: %s", target, exc)
    return soft, hard


#: Allocations of container objects (net of deallocations) between two collections of the
#: youngest generation in a serving process (Python's default: 700).
GC_YOUNG_THRESHOLD = 50_000
#: Allocations of container objects per open connection between two collections of the
#: youngest generation in a serving process (:func:`gc_follow_connections`): twice what a
#: connection and a parked wait hold (counted with ``gc.get_objects()``: 12 for a
#: connection, 4 more for a parked WAIT).
GC_OBJECTS_PER_CONNECTION = 32

_tuned = False  # tune_gc() has set this process's collector for serving


def tune_gc() -> None:
    """Set the garbage collector of a process whose job is serving (``rdzv serve``): freeze
    what is alive now (modules, configuration: never garbage; no collection scans it again)
    and collect the youngest generation every :data:`GC_YOUNG_THRESHOLD` allocations instead
    of 700, the older ones at Python's default ratios to it.

    A server's objects are its connections' and they live as long as the connections: a
    storm of connects allocates a dozen container objects per connection, and with the
    default threshold the collector re-scanned each of them several times over (the
    largest term of the server's own CPU time in a 15,000-connection storm after the
    kernel's, docs/performance.md). Cycles (an exception's traceback) are still collected,
    a little later. Not for a server thread inside another program (its process's collector
    is that program's business).
    """
    global _tuned
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)
    _tuned = True


def gc_follow_connections(connections: int) -> None:
    """In a process set for serving (:func:`tune_gc`; otherwise nothing is changed), collect
    the youngest generation every ``max(GC_YOUNG_THRESHOLD, GC_OBJECTS_PER_CONNECTION x
    connections)`` allocations, ``connections`` being the number open now: the young
    generation holds two waves of connections' objects.

    A storm of N connects and waits (``init_process_group`` on every rank at once) allocates
    ~16 long-lived objects per rank within a second. With a fixed threshold the collector
    ran several times during the storm, each pass scanning up to 50,000 of those objects
    (5 passes, 31 ms of a 15,000-rank storm's server CPU; ~15 ms of its add+wait+get phase),
    and a parked wait's objects, gone once it is woken, were scanned too. Following the
    connection count, no pass comes during the storm; a later pass scans up to 32 objects
    per connection (~5 ms per 1,000 connections, measured as ~0.15 us per object).
    """
    if not _tuned:
        return
    young = max(GC_YOUNG_THRESHOLD, GC_OBJECTS_PER_CONNECTION * connections)
    current, older, oldest = gc.get_threshold()
    if young != current:
        gc.set_threshold(young, older, oldest)
