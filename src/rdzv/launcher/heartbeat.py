"""Worker heartbeats through a shared file, and the stack-dump hook: ``rdzv.heartbeat()``.

Channel (one per worker, no store round trip, no thread): ``rdzv run`` creates for each
worker a 16-byte file named by ``RDZV_HEARTBEAT_FILE``. :func:`heartbeat` maps it once
(``mmap``, shared) and then writes, per call, two little-endian 64-bit integers:

==========  =====  =========================================================
offset      type   meaning
==========  =====  =========================================================
0           u64    beats so far (0: the worker never called ``heartbeat``)
8           i64    the last ``step`` given, :data:`NO_STEP` if none was
==========  =====  =========================================================

The agent (:class:`rdzv.launcher.hangs.HangMonitor`) reads the file every monitor interval
and measures, on its own monotonic clock, how long the count has not moved: no clocks are
compared, and a torn read can only misreport the step by one call.

Stacks: the first :func:`heartbeat` (and :func:`rdzv.connect`) also registers
:mod:`faulthandler` on the signal named by ``RDZV_STACKS_SIGNAL`` (``SIGUSR2`` by
default), writing every thread's Python stack to ``RDZV_STACKS_FILE``; the agent sends that
signal to a hung worker when py-spy is not installed.

Outside ``rdzv run`` (no ``RDZV_HEARTBEAT_FILE``), :func:`heartbeat` does nothing.
"""

from __future__ import annotations

import faulthandler
import mmap
import os
import signal
import struct
from typing import IO

__all__ = [
    "HEARTBEAT_FILE_ENV",
    "NO_STEP",
    "SLOT",
    "STACKS_FILE_ENV",
    "STACKS_SIGNAL_ENV",
    "heartbeat",
    "install_stack_dumper",
]

#: The variable naming a worker's heartbeat file.
HEARTBEAT_FILE_ENV = "RDZV_HEARTBEAT_FILE"
#: The variable naming the file a worker's faulthandler writes its stacks to.
STACKS_FILE_ENV = "RDZV_STACKS_FILE"
#: The variable naming the signal that makes a worker dump its stacks.
STACKS_SIGNAL_ENV = "RDZV_STACKS_SIGNAL"
#: The layout of a heartbeat file (see the module docstring).
SLOT = struct.Struct("<Qq")
#: The step stored when :func:`heartbeat` got none.
NO_STEP = -(2**63)

_pack = SLOT.pack_into
_map: mmap.mmap | None = None
_off = False  # no heartbeat file (not under rdzv run), or it cannot be used
_count = 0
_step = NO_STEP
_stacks: IO[str] | None = None


def install_stack_dumper() -> None:
    """Register the faulthandler stack dump on ``RDZV_STACKS_SIGNAL`` into
    ``RDZV_STACKS_FILE`` (once; nothing outside ``rdzv run``)."""
    global _stacks
    path = os.environ.get(STACKS_FILE_ENV)
    if _stacks is not None or not path:
        return
    name = os.environ.get(STACKS_SIGNAL_ENV, "SIGUSR2")
    try:
        signum = signal.Signals[name]
        _stacks = open(path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the handler)
        faulthandler.register(signum, file=_stacks, all_threads=True, chain=False)
    except (KeyError, OSError, ValueError, RuntimeError):
        _stacks = None  # stacks then come from py-spy only


def _open() -> mmap.mmap | None:
    global _map, _off
    path = os.environ.get(HEARTBEAT_FILE_ENV)
    if not path:
        _off = True
        return None
    try:
        with open(path, "r+b") as f:
            _map = mmap.mmap(f.fileno(), SLOT.size)
    except (OSError, ValueError):
        _off = True
        return None
    install_stack_dumper()
    return _map


def heartbeat(step: int | None = None) -> None:
    """Tell ``rdzv run`` that this worker makes progress; call it every training step.

    ``step``: the current step (an ``int``), shown when the worker is declared hung; None
    keeps the last step given. Costs
    a memory write (well under 2 us; ``bench/failures.py`` measures it), starts no thread and
    talks to no store. A no-op outside ``rdzv run``. With ``rdzv run --hang-timeout S``, a
    worker whose heartbeats stop for ``S`` seconds after its first one is declared hung: its
    stacks are dumped and the job restarts or ends. A worker that never calls it is never
    declared hung.

    Raises TypeError if ``step`` is not an int or None, OverflowError if it does not fit
    in 64 bits.
    """
    global _count, _step
    if _off:
        return
    mm = _map if _map is not None else _open()
    if mm is None:
        return
    if step is None:
        step = _step
    elif step.__class__ is int or isinstance(step, int):
        _step = step
    else:
        raise TypeError(f"rdzv.heartbeat(): step must be an int or None, not {type(step).__name__}")
    _count += 1
    try:
        _pack(mm, 0, _count, step)
    except struct.error:
        raise OverflowError(f"rdzv.heartbeat(): step {step} does not fit in 64 bits") from None
