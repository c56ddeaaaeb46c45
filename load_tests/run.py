"""Headless load test: measure capacity, offer twice that with Locust, check every job, write a summary.

``python -m load_tests.run --start-service --duration 300 --out load_tests/reports/now`` starts a service on
a free loopback port (small queue, so backpressure shows, and the fake judge on MicroWorldBench:
``$MICROVERSE_BENCHMARK``, else the published files at ``../shared/microworldbench`` when present, else the
loader's default, the upstream files downloaded once into a cache); ``--host URL`` targets a running one instead.
Steps:

1. capacity: a short closed-loop run of ``POST /generate`` with enough concurrent clients to keep the batcher
   full; capacity = completed videos / elapsed seconds;
2. load: Locust headless at ``--load-factor`` x capacity (default 2) for ``--duration`` seconds, every user
   paced so that the users together start that many videos per second (HTML report + CSVs);
3. no lost job: every job id created through ``/v1/videos`` must be retrievable and reach completed, or
   failed with a reason, within ``--drain-timeout`` seconds;
4. ``summary.json`` and ``summary.md``: p50/p95/p99, throughput, errors by type, 429s and Retry-After, lost jobs.

Exits 0 when there was no failure (every 5xx, connection error and 429 without Retry-After is one) and no
lost job; 1 otherwise.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx

from load_tests.common import API_KEY_ENV, HOSTS_ENV, JOBS_FILE_ENV, PACING_ENV, video_request
from microverse.tools.service_process import free_port, spawn_service, stop_service, wait_ready

logger = logging.getLogger("load_tests.run")

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
SHARED_BENCHMARK = REPO_ROOT.parent / "shared" / "microworldbench"
"""The published MicroWorldBench beside the checkout: the judge's benchmark when present and none is set."""
TERMINAL = ("completed", "failed")


@dataclass
class Config:
    """Runner options (see ``--help``)."""

    out: Path
    host: str | None = None
    start_service: bool = False
    users: int | None = None
    spawn_rate: float | None = None
    duration: int = 300
    capacity_duration: int = 30
    load_factor: float = 2.0
    max_queue: int = 8
    drain_timeout: int = 180
    judge: bool = True
    api_key: str | None = None
    replicas: tuple[int, ...] = (1,)


@dataclass
class Capacity:
    """Result of the closed-loop capacity run."""

    clients: int
    videos: int
    seconds: float
    videos_per_s: float
    mean_latency_s: float


@dataclass
class JobCheck:
    """Outcome of the lost-job check."""

    created: int = 0
    completed: int = 0
    failed: int = 0
    failed_errors: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    lost_ids: list[str] = field(default_factory=list)
    drain_s: float = 0.0


def headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


@contextmanager
def service(cfg: Config, storage: Path, replicas: int = 1):
    """``replicas`` x ``bentoml serve service:MicroVerse`` on free loopback ports (and the fake judge); yields their
    URLs. Several replicas share a throwaway PostgreSQL job store (``MICROVERSE_DATABASE_URL``) and the storage
    folder (a volume they all mount), so the queue limit is global, and split the machine's cores."""
    with ExitStack() as stack:
        env = {**os.environ, "MICROVERSE_STORAGE_DIR": str(storage), "MICROVERSE_MAX_QUEUE": str(cfg.max_queue)}
        if replicas > 1:
            from microverse.tools.servers import Postgres

            # One machine: the replicas split its cores (each torch would otherwise use them all).
            threads = str(max(1, (os.cpu_count() or 1) // replicas))
            env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
            postgres = Postgres().start()
            stack.callback(postgres.stop)
            env["MICROVERSE_DATABASE_URL"] = postgres.url
        if cfg.judge:
            from evaluation.fake_judge import FakeJudgeServer

            judge = stack.enter_context(FakeJudgeServer())
            env.update(MICROVERSE_JUDGE_BASE_URL=judge.base_url, MICROVERSE_JUDGE_MODEL="fake-judge",
                       MICROVERSE_JUDGE_API_KEY="load-test")
            if not env.get("MICROVERSE_BENCHMARK") and SHARED_BENCHMARK.is_dir():
                env["MICROVERSE_BENCHMARK"] = str(SHARED_BENCHMARK)
        urls = []
        for i in range(replicas):
            port, log = free_port(), cfg.out / ("service.log" if replicas == 1 else f"service-{i}.log")
            proc = spawn_service({**env, "MICROVERSE_REPLICA_ID": f"replica-{i}"}, port, log)
            stack.callback(stop_service, proc)
            wait_ready(proc, port, log)
            urls.append(f"http://127.0.0.1:{port}")
        logger.info("service ready at %s (max_queue=%d)", ", ".join(urls), cfg.max_queue)
        yield urls


def measure_capacity(urls: list[str], clients: int, seconds: float, api_key: str | None) -> Capacity:
    """Closed loop: ``clients`` threads (dealt to the replicas ``urls`` in turn) each send ``POST /generate`` back to
    back for ``seconds``."""
    for url in urls:
        with httpx.Client(base_url=url, headers=headers(api_key), timeout=600) as warm:
            warm.post("/generate", json=video_request()).raise_for_status()
    done: list[tuple[float, float]] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = time.monotonic()
    deadline = start + seconds

    def loop(url: str) -> None:
        with httpx.Client(base_url=url, headers=headers(api_key), timeout=600) as client:
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                resp = client.post("/generate", json=video_request())
                if resp.status_code == 429:
                    time.sleep(float(resp.headers.get("Retry-After", "1")))
                    continue
                with lock:
                    if resp.status_code != 200:
                        errors.append(f"HTTP {resp.status_code}: {resp.text[:200]}")
                        return
                    done.append((t0, time.monotonic()))

    threads = [threading.Thread(target=loop, args=(urls[i % len(urls)],), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors or not done:
        raise RuntimeError(f"the capacity run failed: {errors[:3] or 'no video completed'}")
    elapsed = max(end for _, end in done) - start
    return Capacity(clients=clients, videos=len(done), seconds=round(elapsed, 2),
                    videos_per_s=round(len(done) / elapsed, 3),
                    mean_latency_s=round(sum(e - s for s, e in done) / len(done), 3))


def run_locust(cfg: Config, urls: list[str], users: int, spawn_rate: float, pacing_s: float, classes: list[str],
               jobs_file: Path) -> int:
    """Locust headless for ``cfg.duration`` seconds, its users dealt to the replicas ``urls`` in turn; HTML and CSVs
    under ``cfg.out``; returns its exit code."""
    url = urls[0]
    env = {**os.environ, PACING_ENV: f"{pacing_s:.3f}", JOBS_FILE_ENV: str(jobs_file), HOSTS_ENV: ",".join(urls),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    if cfg.api_key:
        env[API_KEY_ENV] = cfg.api_key
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
           "--users", str(users), "--spawn-rate", f"{spawn_rate:g}", "--run-time", f"{cfg.duration}s",
           "--csv", str(cfg.out / "locust"), "--html", str(cfg.out / "report.html"), "--only-summary",
           "--loglevel", "WARNING", "--logfile", str(cfg.out / "locust.log"), *classes]
    logger.info("locust: %d users, spawn %g/s, pacing %.2f s, %d s, classes %s", users, spawn_rate, pacing_s,
                cfg.duration, classes)
    with open(cfg.out / "locust.out", "wb") as out:
        return subprocess.run(cmd, check=False, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode


def check_jobs(url: str, job_ids: list[str], timeout: float, api_key: str | None) -> JobCheck:
    """Every created job must be retrievable and end completed, or failed with a reason, within ``timeout``."""
    check = JobCheck(created=len(job_ids))
    pending = dict.fromkeys(job_ids, "unchecked")
    start = time.monotonic()
    with httpx.Client(base_url=url, headers=headers(api_key), timeout=30) as client:
        while pending:
            for job_id in list(pending):
                resp = client.get(f"/v1/videos/{job_id}")
                if resp.status_code == 404:
                    pending[job_id] = "not found"
                    continue
                resp.raise_for_status()
                video = resp.json()
                reason = (video.get("error") or {}).get("message")
                pending[job_id] = video["status"] if video["status"] != "failed" or reason else "failed, no reason"
                if video["status"] == "completed":
                    check.completed += 1
                elif video["status"] == "failed" and reason:
                    check.failed += 1
                    code = video["error"]["code"]
                    check.failed_errors[code] = check.failed_errors.get(code, 0) + 1
                else:
                    continue
                del pending[job_id]
            if not pending or time.monotonic() - start > timeout:
                break
            time.sleep(1.0)
    check.lost = len(pending)
    check.lost_ids = [f"{job_id} ({state})" for job_id, state in pending.items()]
    check.drain_s = round(time.monotonic() - start, 1)
    return check


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def ms(value: str) -> float | None:
    return None if value in ("", "N/A") else round(float(value), 1)


def summarize(cfg: Config, urls: list[str], capacity: Capacity, users: int, pacing_s: float, classes: list[str],
              locust_rc: int, jobs: JobCheck) -> dict:
    """Fold Locust's CSVs, the capacity run and the job check into one summary dict."""
    stats = read_csv(cfg.out / "locust_stats.csv")
    failures = read_csv(cfg.out / "locust_failures.csv")
    requests = {}
    for row in stats:
        key = row["Name"] if row["Type"] in ("", "GET", "POST", "DELETE") else f"{row['Type']} {row['Name']}"
        requests[key] = {"count": int(row["Request Count"]), "failures": int(row["Failure Count"]),
                         "p50_ms": ms(row["50%"]), "p95_ms": ms(row["95%"]), "p99_ms": ms(row["99%"]),
                         "max_ms": ms(row["Max Response Time"]), "rps": round(float(row["Requests/s"]), 3)}
    errors = [{"method": r["Method"], "name": r["Name"], "error": r["Error"], "count": int(r["Occurrences"])}
              for r in failures]
    ok = {k: v["count"] - v["failures"] for k, v in requests.items()}
    videos = ok.get("POST /generate", 0) + ok.get("JOB create -> completed", 0)
    throttled = {k.removesuffix(" [429]"): v["count"] for k, v in requests.items() if k.endswith(" [429]")}
    no_retry_after = sum(e["count"] for e in errors if e["error"] == "429 without Retry-After")
    n_429 = sum(throttled.values())
    unexpected_5xx = sum(e["count"] for e in errors if e["error"].startswith("HTTP 5"))
    total_failures = sum(e["count"] for e in errors)
    return {
        "target": ", ".join(urls),
        "replicas": len(urls),
        "started_service": cfg.start_service,
        "max_queue": cfg.max_queue if cfg.start_service else None,
        "capacity": asdict(capacity),
        "load": {"factor": cfg.load_factor, "offered_videos_per_s": round(users / pacing_s, 3), "users": users,
                 "pacing_s": round(pacing_s, 3), "duration_s": cfg.duration, "user_classes": classes,
                 "locust_exit_code": locust_rc},
        "requests": requests,
        "videos_completed": videos,
        "throughput_videos_per_s": round(videos / cfg.duration, 3),
        "backpressure": {"count_429": n_429, "by_request": throttled, "with_retry_after": n_429 - no_retry_after,
                         "without_retry_after": no_retry_after},
        "errors_by_type": errors,
        "failures": total_failures,
        "unexpected_5xx": unexpected_5xx,
        "jobs": asdict(jobs),
        "passed": total_failures == 0 and jobs.lost == 0,
    }


def render_markdown(s: dict) -> str:
    """``summary.md``: the numbers a reader needs, as tables."""
    cap, load, bp, jobs = s["capacity"], s["load"], s["backpressure"], s["jobs"]
    started = (f" (started by the runner: {s['replicas']} replica(s), max_queue={s['max_queue']})"
               if s["started_service"] else "")
    lines = [
        f"# Load test summary: {'PASSED' if s['passed'] else 'FAILED'}",
        "",
        f"- target: {s['target']}{started}",
        (f"- capacity (closed loop, {cap['clients']} clients, {cap['seconds']} s): "
         f"**{cap['videos_per_s']} videos/s** (mean latency {cap['mean_latency_s']} s)"),
        (f"- load: {load['factor']}x capacity = {load['offered_videos_per_s']} videos/s offered by "
         f"{load['users']} users (pacing {load['pacing_s']} s) for {load['duration_s']} s; "
         f"classes {', '.join(load['user_classes'])}"),
        f"- throughput: **{s['throughput_videos_per_s']} videos/s** ({s['videos_completed']} videos completed)",
        (f"- 429 backpressure: **{bp['count_429']}** ({bp['with_retry_after']} with Retry-After, "
        f"{bp['without_retry_after']} without)"),
        f"- failures: **{s['failures']}**, of which unexpected 5xx: **{s['unexpected_5xx']}**",
        (f"- jobs created via /v1/videos: {jobs['created']}; completed {jobs['completed']}, failed with a reason "
        f"{jobs['failed']}, **lost {jobs['lost']}** (drained in {jobs['drain_s']} s)"),
        "",
        "| request | count | failures | p50 ms | p95 ms | p99 ms | max ms | req/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in s["requests"].items():
        lines.append(f"| {name} | {r['count']} | {r['failures']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | "
                     f"{r['max_ms']} | {r['rps']} |")
    lines += ["", "Errors by type:", ""]
    if s["errors_by_type"]:
        lines += ["| method | name | error | count |", "|---|---|---|---:|"]
        lines += [f"| {e['method']} | {e['name']} | {e['error']} | {e['count']} |" for e in s["errors_by_type"]]
    else:
        lines.append("none")
    if jobs["lost_ids"]:
        lines += ["", "Lost jobs:", ""] + [f"- {j}" for j in jobs["lost_ids"]]
    return "\n".join(lines) + "\n"


def execute(cfg: Config, urls: list[str]) -> dict:
    """Capacity, load, job check and summary against the ready replicas at ``urls`` (one service: one URL)."""
    info = httpx.get(urls[0] + "/info", headers=headers(cfg.api_key), timeout=30).json()
    batching = info["batching"]
    clients = max(1, min(batching["max_queue"], 2 * batching["max_batch_size"] * len(urls)))
    capacity = measure_capacity(urls, clients, cfg.capacity_duration, cfg.api_key)
    logger.info("capacity: %s", capacity)
    rate = cfg.load_factor * capacity.videos_per_s
    # Enough users that each one's pacing outlasts a request's wait behind a full queue, so the offered
    # rate holds while the service is saturated.
    queue_wait_s = batching["max_queue"] / capacity.videos_per_s + capacity.mean_latency_s
    users = cfg.users or max(4, math.ceil(1.5 * rate * queue_wait_s))
    pacing_s = users / rate
    spawn_rate = cfg.spawn_rate or max(1.0, users / 10)
    classes = ["GenerateUser", "VideoJobUser"] + (["JudgeMixUser"] if info.get("judge") else [])
    jobs_file = cfg.out / "jobs.txt"
    jobs_file.write_text("")
    rc = run_locust(cfg, urls, users, spawn_rate, pacing_s, classes, jobs_file)
    job_ids = [line for line in jobs_file.read_text().split() if line]
    jobs = check_jobs(urls[-1], job_ids, cfg.drain_timeout, cfg.api_key)  # any replica answers for every job
    summary = summarize(cfg, urls, capacity, users, pacing_s, classes, rc, jobs)
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (cfg.out / "summary.md").write_text(render_markdown(summary))
    return summary


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="python -m load_tests.run", description=__doc__.split("\n\n")[0])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--host", help="base URL of a running service, e.g. http://127.0.0.1:3000 (replicas of one: "
                                       "comma-separated URLs)")
    target.add_argument("--start-service", action="store_true", help="start one on a free loopback port")
    p.add_argument("--users", type=int, help="Locust users (default: enough to hold the offered rate)")
    p.add_argument("--spawn-rate", type=float, help="users started per second (default: users / 10)")
    p.add_argument("--duration", type=int, default=300, help="seconds of load (default 300)")
    p.add_argument("--capacity-duration", type=int, default=30, help="seconds of the capacity run (default 30)")
    p.add_argument("--load-factor", type=float, default=2.0, help="offered load / capacity (default 2)")
    p.add_argument("--max-queue", type=int, default=8, help="MICROVERSE_MAX_QUEUE of a started service")
    p.add_argument("--drain-timeout", type=int, default=180, help="seconds for created jobs to finish")
    p.add_argument("--no-judge", dest="judge", action="store_false", help="start the service without a judge")
    p.add_argument("--api-key", default=os.environ.get("MICROVERSE_API_KEY"), help="Bearer key for the target")
    p.add_argument("--out", type=Path, default=None, help="report folder (default load_tests/reports/<time>)")
    p.add_argument("--replicas", default="1", help="replicas to start (one PostgreSQL job store for several); a "
                                                    "list (1,2) runs each and reports the throughput ratio")
    a = p.parse_args(argv)
    out = a.out or REPO_ROOT / "load_tests" / "reports" / time.strftime("%Y%m%d-%H%M%S")
    return Config(out=out, host=a.host, start_service=a.start_service, users=a.users, spawn_rate=a.spawn_rate,
                  duration=a.duration, capacity_duration=a.capacity_duration, load_factor=a.load_factor,
                  max_queue=a.max_queue, drain_timeout=a.drain_timeout, judge=a.judge, api_key=a.api_key,
                  replicas=tuple(int(n) for n in a.replicas.split(",")))


def main(argv: list[str] | None = None) -> int:
    # A SIGTERM unwinds like Ctrl-C, so the services and the database the runner started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    cfg = parse_args(argv)
    cfg.out.mkdir(parents=True, exist_ok=True)
    if not cfg.start_service:
        summaries = [execute(cfg, [h.rstrip("/") for h in cfg.host.split(",")])]
    else:
        summaries = [run_started(cfg, n) for n in cfg.replicas]
    if len(summaries) > 1:
        (cfg.out / "scaling.md").write_text(render_scaling(summaries))
        print((cfg.out / "scaling.md").read_text())
    else:
        print((cfg.out / "summary.md").read_text())
    print(f"report: {cfg.out}")
    return 0 if all(s["passed"] for s in summaries) else 1


def run_started(cfg: Config, replicas: int) -> dict:
    """Start ``replicas`` replicas and run the load test on them (in ``cfg.out/replicas-N`` when comparing)."""
    one = replace(cfg, out=cfg.out / f"replicas-{replicas}") if len(cfg.replicas) > 1 else cfg
    one.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="microverse-load-") as storage, \
            service(one, Path(storage), replicas) as urls:  # fmt: skip
        return execute(one, urls)


def render_scaling(summaries: list[dict]) -> str:
    """``scaling.md``: throughput and lost jobs at each replica count, and the ratio to the first."""
    base = summaries[0]
    lines = ["# Throughput by replica count", "",
             "| replicas | capacity videos/s | throughput under load videos/s | vs first | completed | lost | passed |",
             "|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for s in summaries:
        ratio = s["throughput_videos_per_s"] / max(base["throughput_videos_per_s"], 1e-9)
        lines.append(f"| {s['replicas']} | {s['capacity']['videos_per_s']} | {s['throughput_videos_per_s']} | "
                     f"{ratio:.2f}x | {s['videos_completed']} | {s['jobs']['lost']} | {s['passed']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
