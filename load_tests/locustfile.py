"""Locust scenarios against a MicroVerse service.

* ``GenerateUser`` (tag ``generate``): synchronous ``POST /generate``, expects an mp4.
* ``VideoJobUser`` (tag ``jobs``): ``POST /v1/videos``, poll ``GET /v1/videos/{id}``, download the content.
* ``JudgeMixUser`` (tag ``judge``): the job flow, then ``POST /judge`` on the finished job (only when the
  target's ``/info`` shows a judge; otherwise the user stops at start).

A 429 is expected backpressure: it is reported under its own name (``<name> [429]``), as a success when it
carries ``Retry-After`` (whole seconds, at least 1) and as a failure when it does not. Any other non-2xx
answer (every 5xx) is a failure named ``HTTP <status>: <error code>``. Each finished job is also reported as a
``JOB`` entry timed from create to completed. ``python -m load_tests.run`` drives this file headless; it also
runs on its own:
``locust -f load_tests/locustfile.py --host http://127.0.0.1:3000 --headless -u 8 -r 2 -t 60s``.
"""

from __future__ import annotations

import itertools
import logging
import os
import time

from locust import HttpUser, constant_pacing, tag, task
from locust.exception import StopUser

from load_tests.common import (
    API_KEY_ENV,
    HOSTS_ENV,
    JOBS_FILE_ENV,
    PACING_ENV,
    job_request,
    video_request,
)

logger = logging.getLogger(__name__)

PACING_S = float(os.environ.get(PACING_ENV, "1.0"))
POLL_S = 0.5
JOB_TIMEOUT_S = 600.0
JOB_NAME = "create -> completed"
USER_NUMBERS = itertools.count()
"""Users in start order, dealt to the replicas of ``LOAD_TEST_HOSTS`` round-robin."""


def error_code(resp) -> str:
    """The service's ``error.code`` from a JSON error body, else a short excerpt of the body."""
    try:
        return resp.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return (resp.text or "")[:80] or "no body"


def accept(resp, name: str) -> bool:
    """Classify a ``catch_response`` response; True for a 2xx the scenario continues with."""
    if resp.status_code == 429:
        resp.request_meta["name"] = f"{name} [429]"
        if resp.headers.get("Retry-After", "").isdigit() and int(resp.headers["Retry-After"]) >= 1:
            resp.success()
        else:
            resp.failure("429 without Retry-After")
        return False
    if 200 <= resp.status_code < 300:
        resp.success()
        return True
    if resp.status_code == 0:
        resp.failure(f"connection error: {type(resp.error).__name__}")
    else:
        resp.failure(f"HTTP {resp.status_code}: {error_code(resp)}")
    return False


class MicroVerseUser(HttpUser):
    """Common setup: pacing from the runner, optional API key, job bookkeeping."""

    abstract = True
    wait_time = constant_pacing(PACING_S)

    def on_start(self) -> None:
        key = os.environ.get(API_KEY_ENV)
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"
        if hosts := os.environ.get(HOSTS_ENV):
            urls = hosts.split(",")
            self.client.base_url = urls[next(USER_NUMBERS) % len(urls)]

    def record_job(self, job_id: str) -> None:
        path = os.environ.get(JOBS_FILE_ENV)
        if path:
            with open(path, "a") as f:
                f.write(job_id + "\n")

    def report_job(self, started: float, error: str | None) -> None:
        self.environment.events.request.fire(
            request_type="JOB", name=JOB_NAME, response_time=(time.perf_counter() - started) * 1000,
            response_length=0, exception=Exception(error) if error else None, context={})

    def run_job(self) -> str | None:
        """Create, poll until finished and download one video; returns the completed job's id."""
        started = time.perf_counter()
        with self.client.post("/v1/videos", json=job_request(), name="POST /v1/videos", catch_response=True) as resp:
            if not accept(resp, "POST /v1/videos"):
                return None
            job_id = resp.json()["id"]
        self.record_job(job_id)
        while True:
            time.sleep(POLL_S)
            with self.client.get(f"/v1/videos/{job_id}", name="GET /v1/videos/{id}", catch_response=True) as resp:
                if not accept(resp, "GET /v1/videos/{id}"):
                    return None
                video = resp.json()
            if video["status"] == "failed":
                self.report_job(started, f"job failed: {(video.get('error') or {}).get('code')}")
                return None
            if video["status"] == "completed":
                break
            if time.perf_counter() - started > JOB_TIMEOUT_S:
                self.report_job(started, f"job not finished after {JOB_TIMEOUT_S:.0f} s")
                return None
        self.report_job(started, None)
        with self.client.get(f"/v1/videos/{job_id}/content", name="GET /v1/videos/{id}/content",
                             catch_response=True) as resp:
            if accept(resp, "GET /v1/videos/{id}/content") and resp.content[4:8] != b"ftyp":
                resp.failure("content is not an mp4")
        return job_id


class GenerateUser(MicroVerseUser):
    """Synchronous generation: one ``POST /generate`` per iteration."""

    @tag("generate")
    @task
    def generate(self) -> None:
        with self.client.post("/generate", json=video_request(), name="POST /generate", catch_response=True) as resp:
            if accept(resp, "POST /generate") and resp.headers.get("content-type") != "video/mp4":
                resp.failure(f"unexpected content-type {resp.headers.get('content-type')}")


class VideoJobUser(MicroVerseUser):
    """The OpenAI-style job flow: create, poll, download."""

    @tag("jobs")
    @task
    def video_job(self) -> None:
        self.run_job()


class JudgeMixUser(MicroVerseUser):
    """The job flow followed by ``POST /judge`` of the finished video against benchmark task 1."""

    def on_start(self) -> None:
        super().on_start()
        info = self.client.get("/info", name="GET /info").json()
        if not info.get("judge"):
            logger.warning("the target has no judge configured (/info judge is null); JudgeMixUser stops")
            raise StopUser()

    @tag("judge")
    @task
    def video_job_and_judge(self) -> None:
        job_id = self.run_job()
        if job_id is None:
            return
        with self.client.post("/judge", json={"job_id": job_id, "task_index": 1}, name="POST /judge",
                              catch_response=True) as resp:
            if accept(resp, "POST /judge") and not 0 <= resp.json().get("task_score", -1) <= 100:
                resp.failure("judge answer without a task_score in 0..100")

