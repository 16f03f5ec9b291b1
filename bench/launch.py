"""Launcher latency: ``rdzv run`` next to ``torchrun``, same nproc, same worker script.

Figures (seconds, CLOCK_MONOTONIC shared by all processes of the machine):

* ``launch``: from just before the launcher process is spawned until the last worker runs
  its first line of Python;
* ``restart``: from the moment a worker exits with an error (it stamps the time, then exits)
  until the last worker of the restarted group runs its first line;
* ``total``: wall time of a job whose workers exit at once (start, rendezvous, exit barrier,
  shutdown).

Both launchers run ``--standalone`` with ``--monitor-interval 0.1`` (torchrun's default) and
``--max-restarts 1``; each figure is measured ``--repeat`` times, alternating launchers,
after one unmeasured warm-up run of each. Bytecode caching is on for the launched processes
(``PYTHONDONTWRITEBYTECODE`` removed, caches under a temporary ``PYTHONPYCACHEPREFIX``), as
for an installed package; otherwise every agent and worker would recompile rdzv's sources
while torch's wheel comes with its bytecode. Prints one JSON object.

    python bench/launch.py --nproc 4 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

WORKER = """
import os, sys, time
t = time.monotonic()
out = sys.argv[1]
attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
rank = os.environ["RANK"]
with open(os.path.join(out, f"start-{attempt}-{rank}"), "w") as f:
    f.write(repr(t))
if sys.argv[2] == "restart" and attempt == "0":
    if rank == "0":
        world = int(os.environ["WORLD_SIZE"])
        while len([n for n in os.listdir(out) if n.startswith("start-0-")]) < world:
            time.sleep(0.001)
        with open(os.path.join(out, "fail"), "w") as f:
            f.write(repr(time.monotonic()))
        sys.exit(1)
    time.sleep(60)
"""


def _launcher_cmd(launcher: str, nproc: int, script: str, out: str, mode: str) -> list[str]:
    common = [
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "--max-restarts",
        "1",
        "--monitor-interval",
        "0.1",
        script,
        out,
        mode,
    ]
    if launcher == "rdzv":
        return [sys.executable, "-m", "rdzv", "run", *common]
    return [sys.executable, "-m", "torch.distributed.run", *common]


_PYCACHE = tempfile.mkdtemp(prefix="rdzv-bench-pycache-")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = _PYCACHE
    return env


def _once(launcher: str, nproc: int, script: str, mode: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="rdzv-bench-") as out:
        cmd = _launcher_cmd(launcher, nproc, script, out, mode)
        t0 = time.monotonic()
        proc = subprocess.run(cmd, env=_env(), capture_output=True, timeout=300)
        t_end = time.monotonic()
        if proc.returncode != 0:
            raise RuntimeError(
                f"{launcher} exited with {proc.returncode}:\n{proc.stderr.decode()[-2000:]}"
            )

        def starts(attempt: int) -> list[float]:
            return [float(Path(out, f"start-{attempt}-{r}").read_text()) for r in range(nproc)]

        if mode == "restart":
            fail = float(Path(out, "fail").read_text())
            return {"restart": max(starts(1)) - fail}
        return {"launch": max(starts(0)) - t0, "total": t_end - t0}


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    samples: dict[str, dict[str, list[float]]] = {
        name: {"launch": [], "total": [], "restart": []} for name in ("rdzv", "torchrun")
    }
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(WORKER)
        script = f.name
    try:
        for name in ("rdzv", "torchrun"):  # warm-up: fill the bytecode caches
            _once(name, args.nproc, script, "plain")
        for _ in range(args.repeat):
            for name in ("rdzv", "torchrun"):
                plain = _once(name, args.nproc, script, "plain")
                samples[name]["launch"].append(plain["launch"])
                samples[name]["total"].append(plain["total"])
                samples[name]["restart"].append(
                    _once(name, args.nproc, script, "restart")["restart"]
                )
    finally:
        os.unlink(script)
        shutil.rmtree(_PYCACHE, ignore_errors=True)
    import torch

    print(
        json.dumps(
            {
                "benchmark": "launcher",
                "workload": {
                    "nproc": args.nproc,
                    "repeat": args.repeat,
                    "mode": "--standalone, --monitor-interval 0.1, --max-restarts 1",
                },
                "seconds": {
                    name: {figure: _stats(v) for figure, v in figures.items()}
                    for name, figures in samples.items()
                },
                "machine": {
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
