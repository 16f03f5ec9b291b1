"""``rdzv demo``: real worker processes meeting through a FileStore."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import subprocess_env


def test_demo_all_gathers_and_sums() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rdzv", "demo", "--nproc", "3", "--json"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    )
    result = json.loads(out.stdout)
    assert result["ok"] is True and result["world_size"] == 3
    for worker in result["workers"]:
        assert worker["rank_sum"] == 3
        assert [g.split(" pid ")[0] for g in worker["gathered"]] == ["rank 0", "rank 1", "rank 2"]


def test_demo_rejects_bad_nproc() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rdzv", "demo", "--nproc", "0"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "--nproc must be >= 1" in out.stderr
