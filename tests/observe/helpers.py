"""``rdzv serve --metrics-port`` in tests, and /metrics parsed with prometheus_client's
parser."""

from __future__ import annotations

import contextlib
import subprocess
import urllib.request
from collections.abc import Iterator

from prometheus_client.parser import text_string_to_metric_families

from tests.server.helpers import rdzv_serve

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@contextlib.contextmanager
def serve_with_metrics(
    *extra: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], int, str]]:
    """``rdzv serve --metrics-port 0 ...``; yields (process, store port, status page URL)."""
    with rdzv_serve("--metrics-port", "0", *extra, env=env) as (proc, port):
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("status page on http://127.0.0.1:"), line
        yield proc, port, line.split()[3]


def scrape(url: str, token: str | None = None) -> Samples:
    """GET /metrics, parsed: (sample name, sorted labels) -> value."""
    request = urllib.request.Request(url + "metrics")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)
