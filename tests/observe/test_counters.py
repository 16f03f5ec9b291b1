"""The plain counters under the metrics: rdzv.stats histograms and the C fast path's counts."""

from __future__ import annotations

import pytest

from rdzv import wire
from rdzv.engine import Engine
from rdzv.server import fastpath
from rdzv.stats import REQUEST_BUCKETS, Histogram, HistogramSnapshot

BOUNDS_NS = [round(b * 1e9) for b in REQUEST_BUCKETS]


def test_histogram_counts_each_observation_in_its_bucket() -> None:
    h = Histogram([0.1, 1.0])
    for seconds in (0.05, 0.1, 0.5, 2.0, 3.0):
        h.observe(seconds)
    snap = h.snapshot()
    assert snap.counts == (2, 1, 2)  # <= 0.1 (upper bound inclusive), <= 1.0, above
    assert snap.count == 5 and snap.total == pytest.approx(5.65)
    assert snap.merged(snap).counts == (4, 2, 4)
    with pytest.raises(ValueError, match="different bucket bounds"):
        snap.merged(HistogramSnapshot((0.5,), (0, 0), 0.0))
    with pytest.raises(ValueError, match="must increase"):
        Histogram([1.0, 1.0])


def test_fast_path_counts_the_requests_it_executes_and_times_reads() -> None:
    engine = Engine()
    executor = fastpath.executor_for(engine, wire.DEFAULT_LIMITS)
    assert executor is not None and not executor.counting
    requests = wire.encode_set(b"/k", b"v") + wire.encode_key(wire.Op.GET, b"/k")
    executor.run(requests, 0, False, 1 << 20)
    assert executor.counters() == ({}, (0,), 0)  # nothing counted while off
    executor.enable_counting(BOUNDS_NS)
    assert executor.counting
    executor.run(requests, 0, False, 1 << 20)
    ops, buckets, _ = executor.counters()
    assert ops == {int(wire.Op.SET): 1, int(wire.Op.GET): 1}
    assert sum(buckets) == 0  # run() is not a read: only the receiver times reads
    replies: list[bytes] = []
    receiver = fastpath.Receiver(executor, replies.append, fastpath.REPLY_LIMIT)
    receiver.write = replies.append
    receiver.enabled = True
    receiver(requests)
    ops, buckets, total_ns = executor.counters()
    assert ops == {int(wire.Op.SET): 2, int(wire.Op.GET): 2}
    assert len(buckets) == len(BOUNDS_NS) + 1 and sum(buckets) == 1 and total_ns > 0
    with pytest.raises(ValueError, match="increase"):
        executor.enable_counting([5, 5])
    with pytest.raises(ValueError, match="at most 32"):
        executor.enable_counting(list(range(1, 40)))
