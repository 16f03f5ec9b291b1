"""How soon a failed rank shows on the status page of ``rdzv run --metrics-port``.

Workload: ``rdzv run --standalone --nproc-per-node 2 --max-restarts R`` of workers that sleep;
each repeat SIGKILLs rank 1 and polls ``/api/status`` (every 10 ms) until the agent's document
names rank 1 as failed by SIGKILL (its live row, or the failures of earlier attempts), then
waits for the restarted workers. The page polls that document every second, so a browser
shows the failure at most 1 s after this figure.

Prints one JSON document: seconds from the kill to the failure in ``/api/status`` per repeat,
and their median and maximum.

Usage (from the repository root)::

    python bench/status_page.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
JOB = """
import os, sys, time
from pathlib import Path
rank, attempt = os.environ["RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"]
Path(sys.argv[1], f"{rank}.{attempt}").write_text(str(os.getpid()))
time.sleep(600)
"""


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def failed_shown(url: str, pid: int) -> bool:
    """The status document shows worker ``pid`` failed by SIGKILL."""
    with urllib.request.urlopen(url + "api/status", timeout=10) as response:
        agent = json.loads(response.read())["agent"]
    live = any(
        w["pid"] == pid and w["state"] == "signal" and "SIGKILL" in (w["cause"] or "")
        for w in agent["workers"]
    )
    return live or any(f["pid"] == pid and "SIGKILL" in f["exit"] for f in agent["failures"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory(prefix="rdzv-bench-page-") as tmp:
        script = Path(tmp, "job.py")
        script.write_text(JOB)
        proc = subprocess.Popen(
            [sys.executable, "-m", "rdzv", "run", "--standalone", "--nproc-per-node", "2",
             "--max-restarts", str(args.repeats), "--shutdown-timeout", "5",
             "--metrics-port", "0", str(script), tmp],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        assert proc.stderr is not None
        url = ""
        while not url:
            line = proc.stderr.readline()
            if not line:
                raise RuntimeError("rdzv run exited before printing its status page URL")
            if "status page on " in line:
                url = line.split()[-1]
        seconds = []
        try:
            for attempt in range(args.repeats):
                pid_file = Path(tmp, f"1.{attempt}")
                wait_for(pid_file.exists, 60, f"rank 1 of attempt {attempt}")
                time.sleep(0.5)  # let the page's document settle on the running workers
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGKILL)
                killed = time.perf_counter()
                wait_for(lambda p=pid: failed_shown(url, p), 30, "the failure in /api/status")
                seconds.append(round(time.perf_counter() - killed, 4))
                print(json.dumps({"attempt": attempt, "seconds": seconds[-1]}), file=sys.stderr)
                wait_for(Path(tmp, f"1.{attempt + 1}").exists, 60, "the restart")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
    print(
        json.dumps(
            {
                "figure": "seconds from a worker's SIGKILL to its failure in /api/status",
                "workload": {
                    "job": "rdzv run --standalone --nproc-per-node 2, workers sleeping",
                    "poll": "GET /api/status every 10 ms",
                    "page": "the page itself polls every 1 s (add up to 1 s in a browser)",
                    "repeats": args.repeats,
                },
                "machine": {
                    "cpus": os.cpu_count(),
                    "system": f"{platform.system()} {platform.release()}",
                    "python": platform.python_version(),
                },
                "seconds": seconds,
                "median": statistics.median(seconds),
                "max": max(seconds),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
