"""Resumable MicroWorldBench runner: obtain videos, judge, score, and read/write upstream results.

Videos come from a folder of ``<index>.mp4`` files (the upstream layout) or are generated
through an endpoint that speaks the service's OpenAI-style ``/v1/videos`` API. Generated
videos are written atomically to ``<out>/videos/<index>.mp4`` and never regenerated; a job
started before a kill is polled again instead of re-submitted. Judgements are cached in
``<out>/cache.sqlite`` (see :mod:`evaluation.cache`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import mimetypes
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import openai
from tqdm import tqdm

from media.video import write_atomic

from .cache import JudgementCache
from .judge import JudgeError, Judgement, Usage, VideoError, VLMJudge, parse_answer, sample_frames
from .microworldbench import DIMENSIONS, Anomaly, Benchmark, Task, select_tasks
from .scoring import SCORINGS, Agreement, Summary, TaskScore, agreement, summarize, task_scorer

logger = logging.getLogger(__name__)


REFERENCE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
"""File endings of per-task reference images."""


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate the benchmark videos from a ``/v1/videos`` endpoint."""

    endpoint: str
    """Base URL of the API, e.g. ``http://127.0.0.1:8000/v1`` (``/v1`` is appended if absent)."""
    api_key: str = "EMPTY"
    """API key for the endpoint."""
    model: str | None = None
    """Video model name sent with each request (None: the server's default)."""
    size: str | None = None
    """``WxH`` (None: the server's default)."""
    seconds: str | None = None
    """Duration (None: the server's default)."""
    num_frames: int | None = None
    """Frame count (extension field)."""
    num_inference_steps: int | None = None
    """Sampling steps (extension field)."""
    guidance_scale: float | None = None
    """CFG scale (extension field)."""
    negative_prompt: str | None = None
    """Negative prompt (extension field)."""
    seed: int | None = 0
    """Base seed; task ``i`` uses ``seed + i``."""
    poll_interval_s: float = 1.0
    """Seconds between status polls."""
    timeout_s: float = 3600.0
    """Give up on one video after this long."""
    max_in_flight: int = 4
    """Jobs queued at the endpoint at once."""
    reference_images: Path | None = None
    """Folder of per-task reference images named by task index (``12.png``, ``.jpg``, ``.jpeg`` or ``.webp``): a
    task with one is sent with it as ``input_reference`` (image-conditioned models); the upstream benchmark is
    text-only, so None (the default) sends none."""

    def reference_for(self, task: Task) -> Path | None:
        """The reference image of ``task`` in :attr:`reference_images`, if there is one."""
        if self.reference_images is None:
            return None
        return next((p for ext in REFERENCE_SUFFIXES if (p := self.reference_images / f"{task.index}{ext}").is_file()),
                    None)

    def base_url(self) -> str:
        """The OpenAI base URL."""
        url = self.endpoint.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"


def _existing_jobs(client: openai.OpenAI, config: GenerationConfig, limit: int = 1000) -> dict[tuple[str, int], str]:
    """Live jobs at the endpoint with this run's settings, by (prompt, seed), from the newest ``limit``.

    A kill between submitting a job and recording its id leaves a job nobody knows; adopting
    it by its prompt and seed avoids generating the same video twice.
    """
    wanted = {"size": config.size, "num_frames": config.num_frames, "num_inference_steps": config.num_inference_steps}
    found: dict[tuple[str, int], str] = {}
    for job in itertools.islice(client.videos.list(limit=100), limit):
        seed = getattr(job, "seed", None)
        if job.status == "failed" or seed is None:
            continue
        if all(v is None or getattr(job, k, None) == v for k, v in wanted.items()):
            found.setdefault((job.prompt, seed), job.id)
    return found


def _start_job(
    client: openai.OpenAI,
    task: Task,
    config: GenerationConfig,
    cache: JudgementCache,
    existing: dict[tuple[str, int], str],
) -> str:
    """The id of the task's live job: one recorded or left before a kill if still usable, else a new one."""
    job_id = cache.job_id(task.index)
    if job_id:
        try:
            if client.videos.retrieve(job_id).status != "failed":
                return job_id
        except openai.NotFoundError:
            pass
    if config.seed is not None and (task.task, config.seed + task.index) in existing:
        job_id = existing[(task.task, config.seed + task.index)]
        logger.info("task %d: adopting job %s already at the endpoint", task.index, job_id)
        cache.set_job_id(task.index, job_id)
        return job_id
    body: dict[str, Any] = {
        k: v
        for k, v in {
            "num_frames": config.num_frames,
            "num_inference_steps": config.num_inference_steps,
            "guidance_scale": config.guidance_scale,
            "negative_prompt": config.negative_prompt,
            "seed": None if config.seed is None else config.seed + task.index,
        }.items()
        if v is not None
    }
    options = {
        k: v
        for k, v in {"model": config.model, "size": config.size, "seconds": config.seconds}.items()
        if v is not None
    }
    reference = config.reference_for(task)
    if reference is not None:
        options["input_reference"] = (reference.name, reference.read_bytes(), mimetypes.guess_type(reference.name)[0])
    job = client.videos.create(prompt=task.task, extra_body=body, **options)
    cache.set_job_id(task.index, job.id)
    return job.id


def generate_videos(
    tasks: Sequence[Task], config: GenerationConfig, out_dir: Path, cache: JudgementCache
) -> dict[int, Path]:
    """Generate the videos of ``tasks`` not yet in ``out_dir``; returns the videos that exist.

    Up to ``config.max_in_flight`` jobs are queued at the endpoint at once (so the service can
    batch them) and polled until done.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    client = openai.OpenAI(base_url=config.base_url(), api_key=config.api_key)
    videos = {t.index: out_dir / f"{t.index}.mp4" for t in tasks if (out_dir / f"{t.index}.mp4").is_file()}
    queue = deque(t for t in tasks if t.index not in videos)
    active: dict[int, tuple[str, float]] = {}  # task index -> (job id, deadline)
    existing = _existing_jobs(client, config) if queue and config.seed is not None else {}
    bar = tqdm(total=len(queue), desc="generating videos", unit="video")
    while queue or active:
        while queue and len(active) < config.max_in_flight:
            task = queue.popleft()
            try:
                active[task.index] = (
                    _start_job(client, task, config, cache, existing),
                    time.monotonic() + config.timeout_s,
                )
            except openai.OpenAIError as exc:
                logger.error("task %d: cannot start generation: %s", task.index, exc)
                bar.update(1)
        time.sleep(config.poll_interval_s)
        for index, (job_id, deadline) in list(active.items()):
            try:
                job = client.videos.retrieve(job_id)
                if job.status == "completed":
                    path = out_dir / f"{index}.mp4"
                    write_atomic(path, client.videos.download_content(job_id).read())
                    cache.set_job_id(index, None)
                    videos[index] = path
                elif job.status == "failed":
                    logger.error("task %d: job %s failed: %s", index, job_id, getattr(job, "error", None))
                elif time.monotonic() > deadline:
                    logger.error("task %d: job %s not done after %.0f s; given up", index, job_id, config.timeout_s)
                else:
                    continue
            except openai.OpenAIError as exc:
                logger.error("task %d: job %s: %s", index, job_id, exc)
            del active[index]
            bar.update(1)
    bar.close()
    return videos


def folder_videos(tasks: Sequence[Task], folder: Path) -> dict[int, Path]:
    """The ``<index>.mp4`` files of ``folder`` for the selected tasks (missing ones are logged)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"video folder {folder} does not exist")
    videos = {t.index: folder / f"{t.index}.mp4" for t in tasks if (folder / f"{t.index}.mp4").is_file()}
    missing = [t.index for t in tasks if t.index not in videos]
    if missing:
        logger.warning("%d selected task(s) have no video in %s: %s", len(missing), folder, missing[:20])
    return videos


def file_sha256(path: Path) -> str:
    """SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class EvalResult:
    """Everything a run produced."""

    model_name: str
    """Name of the evaluated video model."""
    judge_model: str
    """Judge model name."""
    tasks: list[Task]
    """Selected tasks."""
    judgements: dict[int, dict[str, Judgement]]
    """Valid judgements (repeat 0) per task and dimension."""
    scores: list[TaskScore]
    """Per-task scores."""
    videos: dict[int, str] = field(default_factory=dict)
    """Video path per task."""
    missing_videos: list[int] = field(default_factory=list)
    """Selected tasks without a video."""
    agreement: dict[str, Agreement] | None = None
    """Judge self-agreement per dimension, when requested."""
    usage: Usage = field(default_factory=Usage)
    """What this run spent at the judge."""
    cost_total_usd: float = 0.0
    """Cost of every judgement used, cached ones included."""
    anomalies: list[Anomaly] = field(default_factory=list)
    """Benchmark and import anomalies."""
    benchmark_source: str = ""
    """Where the benchmark came from."""
    scoring: str = "corrected"
    """Scoring reading of ``scores`` (:data:`~evaluation.scoring.SCORINGS`)."""
    judge_protocol: str = "ours"
    """Judge protocol that produced the judgements (``upstream`` for an imported upstream result file)."""


def judge_videos(
    tasks: Sequence[Task],
    videos: Mapping[int, Path],
    judge: VLMJudge,
    cache: JudgementCache,
    repeats: Mapping[int, int] | None = None,
) -> dict[tuple[int, str, int], Judgement]:
    """Judge every (task, dimension, repeat) not yet cached; returns all valid judgements.

    ``repeats`` maps task index to how many times it is judged (default 1). The judge protocol's
    version is part of every cache key.
    """
    repeats = repeats or {}
    model = judge.config.model
    protocol = judge.protocol
    todo = [t for t in tasks if t.index in videos]

    def total_for(task: Task) -> int:
        return len(DIMENSIONS) * repeats.get(task.index, 1)

    total = sum(total_for(t) for t in todo)
    results: dict[tuple[int, str, int], Judgement] = {}
    bar = tqdm(total=total, desc="judging", unit="call")

    def work(task: Task) -> None:
        path = videos[task.index]
        sha = file_sha256(path)
        frames = None
        done = 0
        for repeat in range(repeats.get(task.index, 1)):
            for dim in DIMENSIONS:
                key = (sha, task.index, dim, task.rubric_hash(dim), model, protocol.version)
                found = cache.get(*key, repeat=repeat)
                if found is None:
                    if frames is None:
                        try:
                            frames = sample_frames(path, protocol.num_frames)
                        except VideoError as exc:
                            logger.error("task %d: %s: %s; not judged", task.index, path, exc)
                            bar.update(total_for(task) - done)
                            return
                    try:
                        found = judge.judge(frames, task.task, task.requirement, dim, task.rubrics[dim], repeat=repeat)
                    except JudgeError as exc:
                        logger.error("task %d %s: %s", task.index, dim, exc)
                    else:
                        cache.put(*key, found, repeat=repeat)
                if found is not None:
                    results[(task.index, dim, repeat)] = found
                bar.update(1)
                done += 1

    with ThreadPoolExecutor(max_workers=judge.config.concurrency) as pool:
        for future in as_completed([pool.submit(work, t) for t in todo]):
            future.result()
    bar.close()
    return results


def run_eval(
    bench: Benchmark,
    tasks: Sequence[Task],
    judge: VLMJudge,
    out_dir: Path,
    model_name: str,
    *,
    videos_dir: Path | None = None,
    generation: GenerationConfig | None = None,
    agreement_tasks: int = 0,
    agreement_repeats: int = 3,
    seed: int = 0,
    scoring: str = "corrected",
) -> EvalResult:
    """Obtain videos (folder or endpoint), judge, and score the selected tasks in the ``scoring`` reading."""
    if (videos_dir is None) == (generation is None):
        raise ValueError("give exactly one of videos_dir and generation")
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = JudgementCache(out_dir / "cache.sqlite")
    try:
        if generation is not None:
            videos = generate_videos(tasks, generation, out_dir / "videos", cache)
        else:
            videos = folder_videos(tasks, videos_dir)
        repeats = _agreement_repeats(bench, tasks, videos, agreement_tasks, agreement_repeats, seed)
        found = judge_videos(tasks, videos, judge, cache, repeats)
    finally:
        cache.close()
    judgements = _first_judgements(tasks, found)
    scores, scoring_anomalies = score_judged(tasks, judgements, scoring)
    return EvalResult(
        model_name=model_name,
        judge_model=judge.config.model,
        judge_protocol=judge.protocol.name,
        tasks=list(tasks),
        judgements=judgements,
        scores=scores,
        scoring=scoring,
        videos={i: str(p) for i, p in videos.items()},
        missing_videos=[t.index for t in tasks if t.index not in videos],
        agreement=_self_agreement(found, repeats, agreement_repeats) if repeats else None,
        usage=judge.usage,
        cost_total_usd=sum(j.cost_usd for j in found.values()),
        anomalies=list(bench.anomalies) + scoring_anomalies,
        benchmark_source=bench.source,
    )


def _agreement_repeats(
    bench: Benchmark, tasks: Sequence[Task], videos: Mapping[int, Path], agreement_tasks: int, repeats: int, seed: int
) -> dict[int, int]:
    """How many times each task is judged: ``repeats`` for a seeded sample of ``agreement_tasks`` with a video."""
    if not agreement_tasks:
        return {}
    with_video = [t.index for t in tasks if t.index in videos]
    subset = select_tasks(bench, indices=with_video, sample=agreement_tasks, seed=seed)
    return {t.index: repeats for t in subset}


def _first_judgements(
    tasks: Sequence[Task], found: Mapping[tuple[int, str, int], Judgement]
) -> dict[int, dict[str, Judgement]]:
    """The repeat-0 judgement per task and dimension (the ones scored)."""
    return {t.index: {d: found[(t.index, d, 0)] for d in DIMENSIONS if (t.index, d, 0) in found} for t in tasks}


def _self_agreement(
    found: Mapping[tuple[int, str, int], Judgement], repeats: Mapping[int, int], agreement_repeats: int
) -> dict[str, Agreement]:
    """Judge self-agreement per dimension over the repeated tasks judged completely."""
    complete = [i for i, k in repeats.items() if all((i, d, r) in found for d in DIMENSIONS for r in range(k))]
    return {
        d: agreement([[found[(i, d, r)].scores for i in complete] for r in range(agreement_repeats)])
        for d in DIMENSIONS
    }


_UPSTREAM_KEYS = {"scientific": "scientific_eval", "visual": "visual_eval", "instruction": "instruction_eval"}


def export_upstream(result: EvalResult, path: Path) -> None:
    """Write ``<model>_result.json`` in the upstream format (missing dimensions left out).

    ``parsed_result`` is the answer's object as parsed when the judge protocol kept it (``upstream``),
    so the file reads back as the published evaluator would have written it.
    """
    items = []
    for task in result.tasks:
        item: dict[str, Any] = {"index": task.index, "video_path": result.videos.get(task.index, "")}
        for dim, j in result.judgements.get(task.index, {}).items():
            parsed = j.parsed
            if parsed is None:
                parsed = {"scores": j.scores, "reasoning": j.reasoning, "reasons": j.reasons}
            item[_UPSTREAM_KEYS[dim]] = {"raw_response": j.raw_response, "parsed_result": parsed}
        items.append(item)
    write_atomic(path, json.dumps(items, ensure_ascii=False, indent=2).encode())


UpstreamEntry = tuple[Task, dict[str, list[Any]]]
"""One result entry read from an upstream file: its task and its usable scores per dimension (others missing)."""


def import_upstream(
    path: Path, bench: Benchmark, scoring: str = "corrected"
) -> tuple[list[UpstreamEntry], list[Anomaly]]:
    """Read an upstream ``<model>_result.json`` in one scoring reading; returns its entries and the anomalies.

    Every defect is recorded as an :class:`Anomaly` and handled by one rule per reading
    (``corrected`` / ``published``, the latter exactly as the upstream scorer):

    * ``unknown_task`` (index not a benchmark task): ignored / ignored.
    * ``duplicate_index``: later entries ignored, the first kept / every entry scored.
    * ``missing_dimension`` (no ``<dim>_eval``): dimension missing / task skipped.
    * absent or unusable ``parsed_result`` (not an object with a non-empty ``scores`` list):
      re-parsed from ``raw_response`` (``reparsed``), else missing (``invalid_parsed_result``) /
      task skipped (``invalid_parsed_result``; ``empty_scores`` when ``scores`` is empty). In the
      published reading a non-object ``parsed_result``, or ``scores`` that cannot be iterated,
      make the upstream script fail on the whole file: ValueError.
    * ``wrong_length`` (scores for more or fewer criteria): dimension missing / answer ``k``
      read against criterion ``k``, ``M`` over the answered criteria only.
    * ``non_binary_score`` (a score other than 0/1): dimension missing / counts when it equals
      1. In the corrected reading ``true``/``false``, ``1.0``/``0.0`` and ``"1"``/``"0"`` are read
      as 0/1 and recorded as ``coerced_score``.
    * ``judged_without_criteria`` (a ``d11..d55`` block; upstream showed its judge no criteria):
      scored in order / read by the numbers 11..55, so answers 1..5 count for nothing.
    """
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring reading {scoring!r}; choose from {SCORINGS}")
    published = scoring == "published"
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of results")
    entries: list[UpstreamEntry] = []
    anomalies: list[Anomaly] = []
    seen: set[int] = set()
    for position, item in enumerate(data):
        if published and not isinstance(item, dict):
            raise ValueError(f"{path}: entry {position} is not an object; the upstream scorer fails on this file")
        index = item.get("index") if isinstance(item, dict) else None
        try:
            task = bench.tasks.get(index)
        except TypeError:  # an unhashable index
            if published:
                raise ValueError(f"{path}: entry {position} has index {index!r}; the upstream scorer fails") from None
            task = None
        if task is None:
            anomalies.append(
                Anomaly(
                    "unknown_task",
                    f"result for unknown task {index!r} ignored",
                    index if isinstance(index, int) else None,
                )
            )
            continue
        if task.index in seen:
            rule = "scored again, as upstream does" if published else "ignored (the first entry is kept)"
            anomalies.append(Anomaly("duplicate_index", f"task {task.index}: another result entry, {rule}", task.index))
            if not published:
                continue
        seen.add(task.index)
        judgements, found = _read_published(item, task, path) if published else _read_corrected(item, task)
        entries.append((task, judgements))
        anomalies.extend(found)
    return entries, anomalies


def _renumbered(task: Task, dim: str) -> bool:
    """True when the block's published numbers are not 1..n (a ``d11..d55`` block)."""
    return any(c.number not in (0, k) for k, c in enumerate(task.rubrics[dim], 1))


def _binary(scores: Sequence[Any]) -> tuple[list[int], list[Any], list[Any]]:
    """Scores read as 0/1, the values that needed coercing (``true``, ``1.0``, ``"1"``...), and the non-binary ones."""
    values: list[int] = []
    coerced: list[Any] = []
    bad: list[Any] = []
    for value in scores:
        if type(value) is int and value in (0, 1):
            values.append(value)
        elif (isinstance(value, bool | float) and value in (0, 1)) or (
            isinstance(value, str) and value.strip() in ("0", "1")
        ):
            values.append(int(value))
            coerced.append(value)
        else:
            bad.append(value)
    return values, coerced, bad


def _read_corrected(item: Mapping[str, Any], task: Task) -> tuple[dict[str, list[Any]], list[Anomaly]]:
    """The usable judgements of one result entry in the corrected reading (rules: :func:`import_upstream`)."""
    judgements: dict[str, list[Any]] = {}
    anomalies: list[Anomaly] = []
    for dim, key in _UPSTREAM_KEYS.items():

        def note(kind: str, text: str, dim: str = dim) -> None:
            anomalies.append(Anomaly(kind, f"task {task.index} {dim}: {text}", task.index, dim))

        n = len(task.rubrics[dim])
        entry = item.get(key)
        if not entry or not isinstance(entry, dict):
            note("missing_dimension", f"no {key} object; dimension missing")
            continue
        parsed = entry.get("parsed_result")
        scores = parsed.get("scores") if isinstance(parsed, dict) else None
        if not isinstance(scores, list) or not scores:
            raw = entry.get("raw_response")
            try:
                if not isinstance(raw, str) or not raw.strip():
                    raise ValueError("no raw_response")
                scores, _, _ = parse_answer(raw, n)
            except ValueError as exc:
                note("invalid_parsed_result", f"no usable parsed_result nor raw_response ({exc}); dimension missing")
                continue
            note("reparsed", "no usable parsed_result; scores re-parsed from raw_response")
        values, coerced, bad = _binary(scores)
        if coerced:
            note("coerced_score", f"scores {coerced!r} read as 0/1")
        if bad:
            note("non_binary_score", f"scores {bad!r} are not 0 or 1; dimension missing")
        if len(scores) != n:
            note("wrong_length", f"{len(scores)} scores for {n} criteria; dimension missing")
        if bad or len(scores) != n:
            continue
        if _renumbered(task, dim):
            note("judged_without_criteria", "upstream prompt omitted the d11..d55 criteria; scored in order")
        judgements[dim] = values
    return judgements, anomalies


def _published_scores(entry: Any, key: str) -> tuple[Any, str, str, bool]:
    """How the upstream scorer reads one ``<dim>_eval``: ``(scores, kind, why, fatal)``.

    ``scores`` is None when the dimension is unusable; then ``kind``/``why`` describe it and
    ``fatal`` says whether the upstream script would fail on it.
    """
    if entry and not isinstance(entry, dict):
        return None, "invalid_parsed_result", f"{key} is not an object", True
    parsed = entry.get("parsed_result") if entry else None
    if not parsed:
        kind = "invalid_parsed_result" if entry else "missing_dimension"
        return None, kind, "no parsed_result; task skipped, as upstream does (raw_response is not re-parsed)", False
    if not isinstance(parsed, dict):
        return None, "invalid_parsed_result", "parsed_result is not an object", True
    scores = parsed.get("scores", [])
    if not scores:
        return None, "empty_scores", "no scores; task skipped, as upstream does", False
    if not isinstance(scores, Iterable):
        return None, "invalid_parsed_result", f"scores {scores!r} cannot be iterated", True
    return scores, "", "", False


def _read_published(
    item: Mapping[str, Any], task: Task, path: Path
) -> tuple[dict[str, list[Any]], list[Anomaly]]:
    """The judgements of one result entry as the upstream scorer reads them (rules: :func:`import_upstream`).

    Upstream stops at the first unusable dimension, so only a failure it would reach refuses the file.
    """
    judgements: dict[str, list[Any]] = {}
    anomalies: list[Anomaly] = []
    reached = True
    for dim, key in _UPSTREAM_KEYS.items():
        where = f"task {task.index} {dim}"
        scores, kind, why, fatal = _published_scores(item.get(key, {}), key)
        if scores is None:
            if fatal and reached:
                raise ValueError(f"{path}: {where}: {why}; the upstream scorer fails on this file")
            anomalies.append(Anomaly(kind, f"{where}: {why}", task.index, dim))
            reached = False
            continue
        values = list(scores)
        n = len(task.rubrics[dim])
        found = []
        bad = [v for v in values if not (type(v) is int and v in (0, 1))]
        if bad:
            found.append(("non_binary_score", f"scores {bad!r} are not 0 or 1; each counts only if it equals 1"))
        if len(values) != n:
            found.append(
                (
                    "wrong_length",
                    f"{len(values)} scores for {n} criteria; answer k read against criterion k, M over the answered "
                    "criteria only",
                )
            )
        if _renumbered(task, dim):
            found.append(
                (
                    "judged_without_criteria",
                    "upstream prompt omitted the d11..d55 criteria; read by the numbers 11..55, so answers 1..5 "
                    "count for nothing",
                )
            )
        anomalies.extend(Anomaly(k, f"{where}: {text}, as upstream does", task.index, dim) for k, text in found)
        judgements[dim] = values
    return judgements, anomalies


def rescore_upstream(
    path: Path, bench: Benchmark, model_name: str | None = None, scoring: str = "corrected"
) -> EvalResult:
    """Score an upstream result file in a scoring reading (``published``: the upstream scorer bit for bit)."""
    entries, anomalies = import_upstream(path, bench, scoring)
    score = task_scorer(scoring)
    name = model_name or Path(path).name.removesuffix("_result.json")
    return EvalResult(
        model_name=name,
        judge_model="upstream",
        tasks=[t for t, _ in entries],
        judgements={},
        scores=[score(t, j) for t, j in entries],
        anomalies=list(bench.anomalies) + anomalies,
        benchmark_source=bench.source,
        scoring=scoring,
        judge_protocol="upstream",
    )


def score_judged(
    tasks: Sequence[Task], judgements: Mapping[int, Mapping[str, Judgement]], scoring: str
) -> tuple[list[TaskScore], list[Anomaly]]:
    """Score judged tasks in a reading; returns the scores and what the reading could not use as judged.

    Corrected: a judgement whose length differs from the block's criteria (possible under the
    ``upstream`` judge protocol) is recorded as ``wrong_length`` and its dimension is missing.
    Published (the upstream formula on the judgements): a judged ``d11..d55`` block counts for
    nothing (criteria numbered 11..55, answers 1..n) and is recorded as ``renumbered_read_as_empty``.
    """
    score = task_scorer(scoring)
    scores: list[TaskScore] = []
    anomalies: list[Anomaly] = []
    for task in tasks:
        usable: dict[str, list[Any]] = {}
        for dim, j in judgements.get(task.index, {}).items():
            n = len(task.rubrics[dim])
            if scoring == "corrected" and len(j.scores) != n:
                anomalies.append(
                    Anomaly(
                        "wrong_length",
                        f"task {task.index} {dim}: {len(j.scores)} scores for {n} criteria; dimension missing",
                        task.index,
                        dim,
                    )
                )
                continue
            if scoring == "published" and _renumbered(task, dim):
                anomalies.append(
                    Anomaly(
                        "renumbered_read_as_empty",
                        f"task {task.index} {dim}: criteria numbered 11..55 match none of the answers",
                        task.index,
                        dim,
                    )
                )
            usable[dim] = list(j.scores)
        scores.append(score(task, usable))
    return scores, anomalies


def summary_of(result: EvalResult, n_resamples: int = 2000, seed: int = 0) -> Summary:
    """The :class:`~evaluation.scoring.Summary` of a result."""
    return summarize(result.scores, n_selected=len(result.tasks), n_resamples=n_resamples, seed=seed)


def usage_dict(result: EvalResult) -> dict[str, Any]:
    """Judge usage of a run as a plain dict."""
    return {**asdict(result.usage), "cost_usd_total": result.cost_total_usd}
