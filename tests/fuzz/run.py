"""Long fuzzing run: ``python -m tests.fuzz.run --examples N [--target ...] [--engine ...]``.

Runs the properties of :mod:`tests.fuzz.harness` for ``N`` examples per target (drawn by
hypothesis, or with ``--engine random`` by the seeded plain generator, ~100x faster)
and prints one JSON line per target: examples, seconds, and for the live server its
connections/waiters after the run and this process's RSS before/after (a leak shows as
growth). Exit status 1 on the first failure (hypothesis prints the minimal example).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import sys
import time
from typing import Any

from hypothesis import HealthCheck, given, settings

from tests.fuzz import harness


def _rss_kib() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def _run_random(target: str, examples: int, check_every: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    result: dict[str, Any] = {"target": target, "engine": "random", "seed": seed}
    start = time.perf_counter()
    if target == "parser":
        for _ in range(examples):
            stream, cuts = harness.random_request_stream(rng)
            harness.check_request_parser(stream, cuts)
            harness.check_request_parser(stream, cuts, extensions=False)
    elif target == "server":
        live = harness.LiveServer()
        rss_before = _rss_kib()
        try:
            for count in range(1, examples + 1):
                live.feed(*harness.random_request_stream(rng), check=count % check_every == 0)
                if count % 5000 == 0:
                    live.reset()
            live.check()
            result["server_after"] = _server_state(live)
            result["rss_kib_before"], result["rss_kib_after"] = rss_before, _rss_kib()
        finally:
            live.close()
    else:
        raise SystemExit("--engine random covers the targets parser and server")
    result["examples"] = examples
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def _server_state(live: harness.LiveServer) -> dict[str, int]:
    return live.thread.call(
        lambda s: {"connections": s.num_connections, "waiters": s.engine.num_waiters(),
                   "keys": s.engine.num_keys(), "loop_errors": len(live.errors)}
    )  # fmt: skip


def _run(target: str, examples: int, check_every: int) -> dict[str, Any]:
    opts = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    count = 0
    result: dict[str, Any] = {"target": target}
    start = time.perf_counter()
    if target == "parser":

        @opts
        @given(harness.request_streams())
        def prop(case: tuple[bytes, list[int]]) -> None:
            nonlocal count
            count += 1
            harness.check_request_parser(*case)

        prop()
    elif target == "replies":

        @opts
        @given(harness.reply_streams())
        def prop_r(case: tuple[bytes, list[int], list[int]]) -> None:
            nonlocal count
            count += 1
            harness.check_reply_decoders(*case)

        prop_r()
    else:
        live = harness.LiveServer()
        rss_before = _rss_kib()

        @opts
        @given(harness.request_streams())
        def prop_s(case: tuple[bytes, list[int]]) -> None:
            nonlocal count
            count += 1
            live.feed(*case, check=count % check_every == 0)
            if count % 5000 == 0:
                live.reset()

        try:
            prop_s()
            live.check()
            result["server_after"] = _server_state(live)
            result["rss_kib_before"], result["rss_kib_after"] = rss_before, _rss_kib()
        finally:
            live.close()
    result["examples"] = count
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=10_000, help="examples per target")
    parser.add_argument("--target", choices=["all", "parser", "replies", "server"], default="all")
    parser.add_argument(
        "--check-every", type=int, default=50, help="full server check every N inputs"
    )
    parser.add_argument(
        "--engine", choices=["hypothesis", "random"], default="hypothesis",
        help="example generator (random: seeded, much faster, for 100,000s of inputs)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of --engine random")
    args = parser.parse_args()
    logging.getLogger("rdzv.server").setLevel(logging.ERROR)  # one warning per bad input
    targets = ["parser", "replies", "server"] if args.target == "all" else [args.target]
    machine = {"python": platform.python_version(), "machine": platform.machine()}
    for target in targets:
        if args.engine == "random":
            if target == "replies":
                continue
            result = _run_random(target, args.examples, args.check_every, args.seed)
        else:
            result = _run(target, args.examples, args.check_every)
        print(json.dumps({**result, **machine}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
