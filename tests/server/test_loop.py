"""The process settings of a serving process (rdzv.server.loop)."""

from __future__ import annotations

import textwrap

from tests.conftest import run_python

_CHECK = textwrap.dedent(
    """
    import gc, weakref
    from rdzv.server.loop import GC_YOUNG_THRESHOLD, tune_gc

    class Node:
        pass

    defaults = gc.get_threshold()
    tune_gc()
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *defaults[1:]), gc.get_threshold()
    assert gc.get_freeze_count() > 1000, gc.get_freeze_count()  # the modules' objects
    # Cycles made after it are still collected, automatically, once enough is allocated.
    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    keep = [[] for _ in range(2 * GC_YOUNG_THRESHOLD)]
    assert gone() is None
    print("ok")
    """
)


def test_tune_gc_freezes_startup_objects_and_still_collects_cycles() -> None:
    # In a child process: the collector's settings are process-wide.
    done = run_python(_CHECK)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
