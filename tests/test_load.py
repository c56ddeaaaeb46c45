"""A short, bounded run of the load-test runner against services it starts, one replica then two on one PostgreSQL job
store (the 5-minute run is ``make load-test``, ``REPLICAS=1,2`` for both)."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_load_runner_short(tmp_path, bench_dir):
    root = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "load_tests.run", "--start-service", "--duration", "20", "--capacity-duration", "6",
         "--max-queue", "4", "--drain-timeout", "90", "--replicas", "1,2", "--out", str(root)],
        cwd=REPO_ROOT, env={**os.environ, "MICROVERSE_BENCHMARK": str(bench_dir)}, capture_output=True, text=True,
        timeout=840, check=False,
    )
    scaling = (root / "scaling.md").read_text()
    assert "| 1 |" in scaling and "| 2 |" in scaling and "1.00x" in scaling
    for replicas in (1, 2):
        _check_report(root / f"replicas-{replicas}", replicas)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _check_report(out, replicas: int) -> None:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["replicas"] == replicas and summary["target"].count("http://") == replicas
    assert summary["unexpected_5xx"] == 0, summary["errors_by_type"]
    assert summary["failures"] == 0, summary["errors_by_type"]
    assert summary["jobs"]["created"] > 0 and summary["jobs"]["lost"] == 0, summary["jobs"]
    assert summary["jobs"]["completed"] + summary["jobs"]["failed"] == summary["jobs"]["created"]
    assert summary["capacity"]["videos_per_s"] > 0 and summary["videos_completed"] > 0
    bp = summary["backpressure"]
    assert bp["without_retry_after"] == 0 and bp["with_retry_after"] == bp["count_429"]
    assert bp["count_429"] > 0, "2x capacity against a queue of 4 should have hit backpressure"
    for name in ("POST /generate", "POST /v1/videos", "GET /v1/videos/{id}", "JOB create -> completed"):
        assert summary["requests"][name]["count"] > 0, name
        assert summary["requests"][name]["p99_ms"] >= summary["requests"][name]["p50_ms"] > 0
    for name in ("summary.md", "report.html", "locust_stats.csv", "locust_failures.csv"):
        assert (out / name).stat().st_size > 0, name
    assert "lost 0" in (out / "summary.md").read_text()
