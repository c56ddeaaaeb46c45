"""MicroSim-style data pipeline: raw videos -> shots -> normalised clips -> filters -> captions -> metadata.

All state lives in ``<output>/manifest.json`` (sources with their shots, clips with their scores
and drop reasons), rewritten atomically as work completes, so every stage skips what is done and a
killed run resumes where it stopped. Stages run in parallel over files (processes for decoding,
threads for captioning) with a progress bar, and each returns a summary of counts.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from media.video import probe_video, read_video, resize_crop, valid_frame_count, write_mp4

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")


@dataclass
class DataPipelineConfig:
    """Settings of every stage (defaults target Wan2.1 480p training)."""

    input_dir: str = "data/raw"
    """Folder of raw videos (searched recursively; the first sub-folder names the ``level``)."""
    output_dir: str = "data/train"
    """Dataset folder: ``clips/``, ``manifest.json`` and ``metadata.json``."""
    workers: int = max(1, (os.cpu_count() or 2) // 2)
    """Parallel worker processes (1 runs in-process)."""
    scene_threshold: float = 27.0
    """PySceneDetect ``ContentDetector`` threshold (its default)."""
    min_shot_seconds: float = 0.5
    """Shorter shots are merged by the detector."""
    fps: float = 16.0
    """Clips are resampled to this frame rate (Wan2.1: 16)."""
    buckets: tuple[tuple[int, int], ...] = ((480, 832), (832, 480), (624, 624))
    """``(height, width)`` training buckets; each clip is resized and centre-cropped to the closest aspect."""
    max_frames: int = 81
    """Longest clip (a 4k+1 count); the middle of longer shots is kept."""
    min_frames: int = 33
    """Shorter clips are dropped as ``too_short`` (after rounding down to 4k+1)."""
    motion_threshold: float = 0.15
    """Clips whose mean optical-flow magnitude (pixels/frame at <=128 px) is lower are ``static``."""
    dedup_distance: int = 12
    """Clips within this Hamming distance (of 192 dHash bits over 3 frames) of a kept clip are ``duplicate``."""
    classifier: str | None = None
    """VideoMAE classifier folder (``microverse data train-classifier``); None skips the stage."""
    classifier_threshold: float = 0.5
    """Minimum probability of the classifier's positive label to keep a clip."""
    caption_model: str | None = None
    """Vision-language model name on an OpenAI-compatible server; None skips captioning."""
    caption_base_url: str | None = None
    """Base URL of that server (default: ``OPENAI_BASE_URL``)."""
    caption_prompt: str = (
        "Describe this microscopy or scientific animation clip in one or two sentences for a text-to-video "
        "model: the subject, what happens over time, and the imaging style."
    )
    """Instruction sent with the frames."""
    caption_frames: int = 4
    """Frames sent to the VLM per clip."""
    level: str | None = None
    """``level`` for sources not in a sub-folder (e.g. ``cellular``)."""


# -- manifest --------------------------------------------------------------------------------------


class Manifest:
    """``manifest.json``: ``{"sources": {rel: {...}}, "clips": {id: {...}}}``, saved atomically."""

    def __init__(self, root: Path):
        self.path = root / "manifest.json"
        data = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.sources: dict[str, dict] = data.get("sources", {})
        self.clips: dict[str, dict] = data.get("clips", {})
        self._last_save = 0.0

    def save(self, force: bool = True) -> None:
        """Write the manifest (at most every 2 s unless ``force``)."""
        if not force and time.monotonic() - self._last_save < 2.0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"sources": self.sources, "clips": self.clips}, indent=1))
        tmp.replace(self.path)
        self._last_save = time.monotonic()

    def kept(self) -> list[dict]:
        """Clips not dropped by any stage, by id."""
        return [c for _, c in sorted(self.clips.items()) if not c.get("dropped")]


def _run_parallel(fn: Callable, jobs: list, workers: int, desc: str) -> Iterable[tuple]:
    """Yield ``(job, result)`` as they finish; in-process for ``workers == 1``."""
    if workers <= 1 or len(jobs) <= 1:
        for job in tqdm(jobs, desc=desc, disable=not jobs):
            yield job, fn(job)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(fn, job): job for job in jobs}
        for future in tqdm(as_completed(futures), total=len(futures), desc=desc):
            yield futures[future], future.result()


def _log_summary(stage: str, summary: dict) -> dict:
    logger.info("%s: %s", stage, ", ".join(f"{k}={v}" for k, v in summary.items()))
    return summary


# -- stage 1: shots ----------------------------------------------------------------------------------


def _detect(job: tuple[str, float, float]) -> dict:
    from scenedetect import ContentDetector, detect

    path, threshold, min_seconds = job
    try:
        fps = probe_video(path, count_frames=False).fps
        detector = ContentDetector(threshold=threshold, min_scene_len=max(1, round(min_seconds * fps)))
        scenes = detect(path, detector, start_in_scene=True)
    except Exception as e:  # unreadable or corrupt file
        return {"broken": f"{type(e).__name__}: {e}"}
    if not scenes:
        return {"broken": "no frames"}
    return {"shots": [[s.seconds, e.seconds] for s, e in scenes]}


def detect_shots(cfg: DataPipelineConfig) -> dict:
    """Stage 1: cut every new source video into shots (PySceneDetect ``ContentDetector``)."""
    root, out = Path(cfg.input_dir), Path(cfg.output_dir)
    manifest = Manifest(out)
    sources = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
    todo = [p for p in sources if str(p.relative_to(root)) not in manifest.sources]
    jobs = [(str(p), cfg.scene_threshold, cfg.min_shot_seconds) for p in todo]
    for (path, *_), result in _run_parallel(_detect, jobs, cfg.workers, "shots"):
        manifest.sources[str(Path(path).relative_to(root))] = result
        manifest.save(force=False)
    manifest.save()
    done = manifest.sources.values()
    return _log_summary("shots", {
        "sources": len(sources), "new": len(todo), "broken": sum("broken" in s for s in done),
        "shots": sum(len(s.get("shots", [])) for s in done),
    })  # fmt: skip


# -- stage 2: clips ----------------------------------------------------------------------------------


def clip_id(source: str, shot: int) -> str:
    """Stable id of a shot: the source path made filename-safe plus the shot index."""
    return f"{re.sub(r'[^A-Za-z0-9]+', '_', Path(source).with_suffix('').as_posix()).strip('_')}-{shot:03d}"


def _cut(job: dict) -> dict:
    """Decode one shot, resample, keep the middle ``4k+1`` frames, resize/crop, encode."""
    try:
        frames, fps = read_video(job["path"], fps=job["fps"], start=job["start"], end=job["end"])
    except Exception as e:
        return {"dropped": "broken", "error": f"{type(e).__name__}: {e}"}
    n = valid_frame_count(len(frames), job["max_frames"])
    if n < max(job["min_frames"], 1):
        return {"dropped": "too_short", "frames": len(frames)}
    first = (len(frames) - n) // 2
    h, w = frames.shape[1:3]
    height, width = min(job["buckets"], key=lambda b: abs(np.log((b[1] / b[0]) / (w / h))))
    clip = resize_crop(frames[first : first + n], height, width)
    write_mp4(job["out"], clip, fps)
    return {
        "clip_start": job["start"] + first / fps,
        "clip_end": job["start"] + (first + n) / fps,
        "frames": n, "height": height, "width": width, "fps": fps,
    }  # fmt: skip


def existing_captions(root: Path) -> dict[str, str]:
    """Captions shipped with the sources (kept instead of VLM captions), by path relative to ``root``:
    rows of an upstream-format ``root/metadata.json``, overridden by ``<video>.txt`` sidecars."""
    captions = {}
    if (root / "metadata.json").exists():
        rows = json.loads((root / "metadata.json").read_text())
        captions = {str(Path(r["video"])): r["prompt"] for r in rows if r.get("prompt")}
    for sidecar in root.rglob("*.txt"):
        text = sidecar.read_text().strip()
        for ext in VIDEO_EXTENSIONS:
            if text and sidecar.with_suffix(ext).exists():
                captions[str(sidecar.with_suffix(ext).relative_to(root))] = text
    return captions


def cut_clips(cfg: DataPipelineConfig) -> dict:
    """Stage 2: one normalised clip per shot (``clips/<id>.mp4``); broken and too short are dropped."""
    root, out = Path(cfg.input_dir), Path(cfg.output_dir)
    manifest = Manifest(out)
    # A killed run leaves "pending" records: forget them so this run cuts them again.
    for cid in [c for c, r in manifest.clips.items() if r.get("pending")]:
        del manifest.clips[cid]
    jobs = []
    captions = existing_captions(root)
    for source, info in sorted(manifest.sources.items()):
        level = Path(source).parts[0] if len(Path(source).parts) > 1 else cfg.level
        for i, (start, end) in enumerate(info.get("shots", [])):
            cid = clip_id(source, i)
            if cid in manifest.clips:
                continue
            record = {"id": cid, "video": f"clips/{cid}.mp4", "source": source,
                      "shot_start": start, "shot_end": end, "level": level}  # fmt: skip
            if source in captions:
                record["prompt"], record["caption_source"] = captions[source], "provided"
            manifest.clips[cid] = {**record, "pending": True}
            jobs.append({
                "id": cid, "path": str(root / source), "start": start, "end": end, "out": str(out / record["video"]),
                "fps": cfg.fps, "max_frames": cfg.max_frames, "min_frames": cfg.min_frames, "buckets": cfg.buckets,
            })  # fmt: skip
    for job, result in _run_parallel(_cut, jobs, cfg.workers, "clips"):
        record = manifest.clips[job["id"]]
        record.pop("pending")
        record.update(result)
        manifest.save(force=False)
    manifest.save()
    reasons = Counter(r.get("dropped") for r in manifest.clips.values())
    kept = reasons.pop(None, 0)
    return _log_summary("clips", {"new": len(jobs), "kept": kept, **{f"dropped_{k}": v for k, v in reasons.items()}})


# -- stage 3: motion and near-duplicates -------------------------------------------------------------


def motion_score(frames: np.ndarray) -> float:
    """Mean Farneback optical-flow magnitude between consecutive frames (pixels/frame, <=128 px side)."""
    scale = min(1.0, 128 / min(frames.shape[1:3]))
    small = [cv2.resize(f, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) for f in frames]
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in small]
    mags = [
        np.linalg.norm(cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 9, 3, 5, 1.1, 0), axis=-1).mean()
        for a, b in itertools.pairwise(gray)
    ]
    return float(np.mean(mags)) if mags else 0.0


def dhash(frames: np.ndarray) -> str:
    """192-bit difference hash (first, middle and last frame, 8x8 each) as hex."""
    bits = []
    for f in (frames[0], frames[len(frames) // 2], frames[-1]):
        small = cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), (9, 8), interpolation=cv2.INTER_AREA).astype(np.int16)
        bits.extend((small[:, 1:] > small[:, :-1]).flatten())
    return f"{int(''.join('1' if b else '0' for b in bits), 2):048x}"


def _score(job: tuple[str, str]) -> dict:
    _cid, path = job
    try:
        frames, _ = read_video(path)
    except Exception as e:
        return {"dropped": "broken", "error": f"{type(e).__name__}: {e}"}
    if len(frames) < 2:
        return {"dropped": "broken", "error": "fewer than 2 frames"}
    return {"motion_score": motion_score(frames), "dhash": dhash(frames)}


def score_clips(cfg: DataPipelineConfig) -> dict:
    """Stage 3: motion score (drops ``static``) and perceptual hash of each kept clip."""
    out = Path(cfg.output_dir)
    manifest = Manifest(out)
    jobs = [(c["id"], str(out / c["video"])) for c in manifest.kept() if "motion_score" not in c]
    for (cid, _), result in _run_parallel(_score, jobs, cfg.workers, "motion"):
        manifest.clips[cid].update(result)
        if result.get("motion_score", 1e9) < cfg.motion_threshold:
            manifest.clips[cid]["dropped"] = "static"
        manifest.save(force=False)
    manifest.save()
    static = sum(c.get("dropped") == "static" for c in manifest.clips.values())
    return _log_summary("motion", {"scored": len(jobs), "static": static})


def dedup_clips(cfg: DataPipelineConfig) -> dict:
    """Stage 4: drop clips within ``dedup_distance`` of an earlier kept clip (by id order)."""
    manifest = Manifest(Path(cfg.output_dir))
    kept: list[tuple[str, int]] = []
    dropped = 0
    for clip in manifest.kept():
        h = int(clip["dhash"], 16)
        match = next((cid for cid, other in kept if (h ^ other).bit_count() <= cfg.dedup_distance), None)
        if match is None:
            kept.append((clip["id"], h))
        else:
            clip.update(dropped="duplicate", duplicate_of=match)
            dropped += 1
    manifest.save()
    return _log_summary("dedup", {"kept": len(kept), "duplicates": dropped})


# -- stage 5: classifier -----------------------------------------------------------------------------


def classify_clips(cfg: DataPipelineConfig, batch_size: int = 8) -> dict:
    """Stage 5: VideoMAE classifier probability of the positive label; below threshold -> ``off_topic``."""
    if cfg.classifier is None:
        return _log_summary("classify", {"skipped": "no classifier"})
    from training.data.classifier import VideoClassifier

    out = Path(cfg.output_dir)
    manifest = Manifest(out)
    model = VideoClassifier.load(cfg.classifier)
    todo = [c for c in manifest.kept() if "classifier_score" not in c]
    for i in tqdm(range(0, len(todo), batch_size), desc="classify", disable=not todo):
        batch = todo[i : i + batch_size]
        for clip, p in zip(batch, model.score([out / c["video"] for c in batch]), strict=True):
            clip["classifier_score"] = p
            if p < cfg.classifier_threshold:
                clip["dropped"] = "off_topic"
        manifest.save(force=False)
    manifest.save()
    return _log_summary("classify", {
        "scored": len(todo), "off_topic": sum(c.get("dropped") == "off_topic" for c in manifest.clips.values())
    })  # fmt: skip


# -- stage 6: captions -------------------------------------------------------------------------------


def caption_clips(cfg: DataPipelineConfig) -> dict:
    """Stage 6: caption kept clips that have no prompt yet with an OpenAI-compatible VLM (threads)."""
    out = Path(cfg.output_dir)
    manifest = Manifest(out)
    todo = [c for c in manifest.kept() if not c.get("prompt")]
    if cfg.caption_model is None or not todo:
        return _log_summary("caption", {"captioned": 0, "missing": len(todo)})
    from concurrent.futures import ThreadPoolExecutor

    from training.data.caption import Captioner

    captioner = Captioner(cfg.caption_model, cfg.caption_base_url, cfg.caption_prompt, cfg.caption_frames)
    failed = 0
    with ThreadPoolExecutor(max(1, cfg.workers * 2)) as pool:
        futures = {pool.submit(captioner.caption, out / c["video"]): c for c in todo}
        for future in tqdm(as_completed(futures), total=len(futures), desc="caption"):
            clip = futures[future]
            try:
                clip["prompt"], clip["caption_source"] = future.result(), cfg.caption_model
            except Exception as e:  # keep going; the clip is retried on the next run
                logger.warning("captioning %s failed: %s", clip["id"], e)
                failed += 1
            manifest.save(force=False)
    manifest.save()
    return _log_summary("caption", {"captioned": len(todo) - failed, "failed": failed})


# -- stage 7: metadata -------------------------------------------------------------------------------

METADATA_FIELDS = (
    "source", "shot_start", "shot_end", "clip_start", "clip_end", "frames", "height", "width", "fps",
    "motion_score", "classifier_score", "caption_source", "level",
)  # fmt: skip


def write_metadata(cfg: DataPipelineConfig) -> dict:
    """Stage 7: ``metadata.json`` (upstream ``id``, ``video``, ``prompt`` plus our fields) of the kept,
    captioned clips."""
    out = Path(cfg.output_dir)
    manifest = Manifest(out)
    kept = manifest.kept()
    rows = [
        {"id": c["id"], "video": c["video"], "prompt": c["prompt"], **{k: c.get(k) for k in METADATA_FIELDS}}
        for c in kept
        if c.get("prompt")
    ]
    tmp = out / "metadata.json.tmp"
    tmp.write_text(json.dumps(rows, indent=1))
    tmp.replace(out / "metadata.json")
    return _log_summary("metadata", {"clips": len(rows), "uncaptioned": len(kept) - len(rows)})


STAGES: dict[str, Callable[[DataPipelineConfig], dict]] = {
    "shots": detect_shots,
    "clips": cut_clips,
    "motion": score_clips,
    "dedup": dedup_clips,
    "classify": classify_clips,
    "caption": caption_clips,
    "metadata": write_metadata,
}


def build_dataset(cfg: DataPipelineConfig) -> dict[str, dict]:
    """Run every stage in order; returns each stage's summary."""
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.output_dir) / "pipeline.json").write_text(json.dumps(asdict(cfg), indent=1))
    return {name: stage(cfg) for name, stage in STAGES.items()}
