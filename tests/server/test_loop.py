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


_FOLLOW = textwrap.dedent(
    """
    import gc, time
    from rdzv.server import ServerThread, loop
    from tests.server.helpers import Raw

    young = loop.GC_YOUNG_THRESHOLD
    before = gc.get_threshold()
    loop.gc_follow_connections(100_000)  # not set for serving: the program's business
    assert gc.get_threshold() == before, gc.get_threshold()
    loop.tune_gc()
    loop.gc_follow_connections(10)
    assert gc.get_threshold()[0] == young, gc.get_threshold()
    many = 3 * young // loop.GC_OBJECTS_PER_CONNECTION
    loop.gc_follow_connections(many)
    assert gc.get_threshold() == (loop.GC_OBJECTS_PER_CONNECTION * many, *before[1:])
    loop.gc_follow_connections(0)
    assert gc.get_threshold()[0] == young, gc.get_threshold()

    # The server reports its connection count as connections open and close (a large
    # per-connection figure makes three connections count).
    loop.GC_OBJECTS_PER_CONNECTION = young
    thread = ServerThread("127.0.0.1", 0).start()
    clients = [Raw(thread.port) for _ in range(3)]
    for client in clients:
        client.ping()
    assert gc.get_threshold()[0] == 3 * young, gc.get_threshold()
    clients.pop().close()
    deadline = time.monotonic() + 10
    while gc.get_threshold()[0] != 2 * young and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gc.get_threshold()[0] == 2 * young, gc.get_threshold()
    thread.stop()
    print("ok")
    """
)


def test_the_young_generation_follows_the_connection_count() -> None:
    done = run_python(_FOLLOW)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
