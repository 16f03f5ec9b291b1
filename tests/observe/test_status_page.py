"""The status page in a real browser: a small ``rdzv run --metrics-port`` job loses a worker
to SIGKILL; the page shows the failed rank and its cause, then the restarted ranks."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import subprocess_env
from tests.observe.helpers import scrape, value
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
def run_job(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``rdzv run`` of two workers with one restart allowed; yields (agent, page URL)."""
    script = tmp_path / "job.py"
    script.write_text(JOB)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rdzv", "run", "--standalone", "--nproc-per-node", "2",
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
