"""Event-loop helpers of the server: the loop it runs on (uvloop when installed) and the
descriptor limit it raises (a server holds one descriptor per client)."""

from __future__ import annotations

import asyncio
import logging

__all__ = ["new_event_loop", "raise_fd_limit"]

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
