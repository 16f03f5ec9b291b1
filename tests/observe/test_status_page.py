"""The status page in a real browser: a small ``rdzv run --metrics-port`` job loses a worker
to SIGKILL; the page shows the failed rank and its cause, then the restarted ranks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.support.ui import WebDriverWait

from rdzv.launcher.status import RendezvousStatus, SlotStatus, render_web
from tests.conftest import subprocess_env
from tests.launcher.cluster import store_server
from tests.observe.helpers import scrape, serve_with_metrics, value
from tests.server.helpers import eventually

JOB = """
import os, sys, time
from pathlib import Path
rank, attempt = os.environ["RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"]
Path(sys.argv[1], f"{rank}.{attempt}").write_text(str(os.getpid()))
time.sleep(110)
"""

# The row of rank 1 in a failed state, in the live ranks table or the failures of earlier
# attempts, whose cause names SIGKILL: returns the cause text or null.
FAILED_RANK_1 = """
for (const row of document.querySelectorAll(
    '#ranks tr[data-rank="1"][data-state="signal"], #failures tr[data-rank="1"]')) {
  const cause = row.querySelector('.cause');
  if (cause && cause.textContent.includes('SIGKILL')) return cause.textContent;
}
return null;
"""


@contextlib.contextmanager
def run_job(tmp_path: Path, *rendezvous: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``rdzv run`` of two workers with one restart allowed, ``--standalone`` unless
    ``rendezvous`` options are given; yields (agent, page URL)."""
    script = tmp_path / "job.py"
    script.write_text(JOB)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rdzv", "run", *(rendezvous or ["--standalone"]),
         "--nproc-per-node", "2",
         "--max-restarts", "1", "--monitor-interval", "0.1", "--shutdown-timeout", "5",
         "--metrics-port", "0", str(script), str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )  # fmt: skip
    lines: list[str] = []
    found = threading.Event()

    def drain() -> None:  # read stderr to the end, so the agent never blocks on it
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "status page on " in line:
                found.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        assert found.wait(30), f"no status page URL from rdzv run: {''.join(lines)}"
        url = next(line for line in lines if "status page on " in line).split()[-1]
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        reader.join(10)


def test_page_shows_the_failed_rank_and_its_cause(
    tmp_path: Path, browser: webdriver.Chrome
) -> None:
    with run_job(tmp_path) as (agent, url):
        eventually(
            lambda: (tmp_path / "0.0").exists() and (tmp_path / "1.0").exists(),
            timeout=30,
            what="both workers started",
        )
        browser.get(url)
        WebDriverWait(browser, 20).until(
            lambda d: d.find_elements(
                "css selector", '#ranks tr[data-rank="1"][data-state="running"]'
            ),
            "the page shows rank 1 running",
        )
        os.kill(int((tmp_path / "1.0").read_text()), signal.SIGKILL)
        killed = time.monotonic()
        cause = WebDriverWait(browser, 15, poll_frequency=0.05).until(
            lambda d: d.execute_script(FAILED_RANK_1), "the page shows rank 1 failed by SIGKILL"
        )
        print(f"failed rank shown {time.monotonic() - killed:.2f} s after the kill: {cause}")
        # After the restart: both ranks run again and the failure stays listed.
        eventually(lambda: (tmp_path / "1.1").exists(), timeout=30, what="the group restarted")
        WebDriverWait(browser, 15).until(
            lambda d: (
                len(d.find_elements("css selector", '#ranks tr[data-state="running"]')) == 2
                and d.find_elements("css selector", '#failures tr[data-rank="1"]')
            ),
            "the page shows the restarted ranks and the earlier failure",
        )
        # The failure record the agent published (every node's view) names it too.
        record = browser.find_element(
            "css selector", '#job-failures tr[data-rank="1"][data-kind="signal"] .cause'
        )
        assert "SIGKILL" in record.text
        assert "1 of 1" in browser.find_element("css selector", "#restarts").text
        screenshot = os.environ.get("RDZV_STATUS_SCREENSHOT")
        if screenshot:
            browser.save_screenshot(screenshot)
        assert agent.poll() is None


def test_agent_metrics_count_rounds_restarts_and_exits(tmp_path: Path) -> None:
    with run_job(tmp_path) as (_, url):
        eventually(
            lambda: (tmp_path / "0.0").exists() and (tmp_path / "1.0").exists(),
            timeout=30,
            what="both workers started",
        )
        before = scrape(url)
        assert value(before, "rdzv_agent_rendezvous_rounds_total") == 1
        assert value(before, "rdzv_agent_workers", state="running") == 2
        os.kill(int((tmp_path / "1.0").read_text()), signal.SIGKILL)
        eventually(lambda: (tmp_path / "1.1").exists(), timeout=30, what="the group restarted")
        eventually(
            lambda: value(scrape(url), "rdzv_agent_workers", state="running") == 2,
            timeout=10,
            what="two workers running again",
        )
        after = scrape(url)
        assert value(after, "rdzv_agent_rendezvous_rounds_total") == 2
        assert value(after, "rdzv_agent_rendezvous_join_duration_seconds_count") == 2
        assert value(after, "rdzv_agent_restarts_total", cause="worker_failure") == 1
        assert value(after, "rdzv_agent_restarts_total", cause="scale_up") == 0
        assert value(after, "rdzv_agent_worker_exits_total", cause="signal") == 1
        assert value(after, "rdzv_agent_worker_exits_total", cause="stopped") == 1
        assert value(after, "rdzv_agent_worker_exits_total", cause="succeeded") == 0


def test_rdzv_status_web_prints_the_agents_page_url(tmp_path: Path) -> None:
    with store_server() as port:
        endpoint = ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "watched"]
        status = [sys.executable, "-m", "rdzv", "status", "--endpoint", f"127.0.0.1:{port}",
                  "--run-id", "watched", "--web"]  # fmt: skip
        with run_job(tmp_path, *endpoint, "--local-addr", "127.0.0.1") as (_, url):
            eventually(lambda: (tmp_path / "0.0").exists(), timeout=30, what="workers started")
            result = subprocess.run(
                status, capture_output=True, text=True, timeout=60, env=subprocess_env()
            )
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip() == f"node 0 (127.0.0.1): {url}"
        none = subprocess.run(
            [*status[:-1], "--run-id", "other", "--web"],
            capture_output=True,
            text=True,
            timeout=60,
            env=subprocess_env(),
        )
        assert none.returncode == 1
        assert "'other'" in none.stderr  # no such run in this store


def test_status_web_says_how_to_get_a_page() -> None:
    status = RendezvousStatus("job", "", False, 0, 1)
    status.members = [SlotStatus(round=0, slot=1, addr="h", pid=1, rank=0)]
    assert "--metrics-port" in render_web(status)
    status.members[0].web = "http://h:1/"
    assert render_web(status) == "node 0 (h): http://h:1/"


def test_store_status_shows_the_run_its_nodes_and_failures(tmp_path: Path) -> None:
    with serve_with_metrics() as (_, port, url):
        endpoint = ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "watched"]
        with run_job(tmp_path, *endpoint, "--local-addr", "127.0.0.1"):
            eventually(
                lambda: (tmp_path / "0.0").exists() and (tmp_path / "1.0").exists(),
                timeout=30,
                what="both workers started",
            )
            # The store process scans its keys for runs every RUN_SCAN_INTERVAL seconds.
            eventually(lambda: store_run(url) is not None, timeout=10, what="the run is listed")
            run = store_run(url)
            assert run is not None and run["round"] is not None and run["world_size"] == 1
            [member] = run["members"]
            assert (member["addr"], member["nproc"], member["state"]) == ("127.0.0.1", 2, "member")
            assert run["failures"] == []
            os.kill(int((tmp_path / "1.0").read_text()), signal.SIGKILL)
            eventually(lambda: bool(store_run(url)["failures"]), what="the failure record")
            [failure] = store_run(url)["failures"]
            assert (failure["rank"], failure["kind"], failure["signal"]) == (1, "signal", "SIGKILL")
            assert "SIGKILL" in failure["how"]
            # After the restart (a new round, whose store has its own log) it is still shown.
            eventually(lambda: (tmp_path / "1.1").exists(), timeout=30, what="the restart")
            eventually(
                lambda: store_run(url)["round"] > run["round"], what="the new round completed"
            )
            assert [f["rank"] for f in store_run(url)["failures"]] == [1]


def store_run(url: str) -> Any:
    """The run "watched" in the store server's status document (None: not listed yet)."""
    with urllib.request.urlopen(url + "api/status", timeout=10) as response:
        doc = json.loads(response.read())
    assert doc["kind"] == "store"
    runs = [r for r in doc["runs"] if r["run_id"] == "watched"]
    assert len(runs) <= 1
    return runs[0] if runs else None
