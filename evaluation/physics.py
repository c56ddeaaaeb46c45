"""Physics-grounded video metrics: measure from a video what the micro-world simulator controls.

Analysers work on ``uint8`` frames ``(T, H, W, 3)`` (or an mp4 path): blobs are found per frame as
connected components of the absolute deviation from the frame's median (so fluorescence blobs and
dark brightfield cells are both foreground), linked into tracks by nearest neighbour, and turned
into blob counts, foreground area, mean squared displacement slope (diffusion coefficient in
px^2/frame), mean velocity (tracking, cross-checked by Farneback optical flow) and net drift toward
a source. ``check_process`` compares a measurement with a simulator clip's parameters;
``evaluate_physics`` runs held-out simulator prompts through any ``generate(prompt, seed) -> frames``
callable and reports per-process accuracy; ``acceptance_checks`` runs issue 5's two fixed-prompt
checks. ``through_vae`` passes the simulator clips through a VAE: the ceiling of any model decoding
with it. ``physics_command`` (``microverse eval physics``) compares sources (simulator ceiling, a VAE's
reconstruction ceiling, a ``WanPipeline`` folder such as an untrained floor, a folder of clips) in a
Markdown/JSON report with plots.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import cv2
import numpy as np
from tqdm import tqdm

from training.simulator import DIRECTIONS, LOOKS, PROCESSES, clip_seeds, parse_processes, render_clip, simulate_prompt

logger = logging.getLogger(__name__)

HELDOUT_SEED = 20_251_126
"""Base seed of the held-out evaluation clips (training datasets use small seeds such as 0)."""

#: ``generate(prompt, seed)`` returns frames ``(T, H, W, 3)`` uint8 (or float in [0, 1]) or an mp4 path.
Generate = Callable[[str, int], "np.ndarray | str | Path"]


@dataclass
class AnalysisConfig:
    """Settings of blob detection and tracking."""

    blur_sigma: float = 1.0
    """Gaussian blur (px) applied to the foreground map before thresholding."""
    rel_threshold: float = 0.4
    """Foreground threshold as a fraction of the video's 99.9th-percentile foreground value."""
    noise_factor: float = 6.0
    """Foreground threshold floor as a multiple of the median foreground value (the noise level)."""
    min_area: int = 3
    """Smallest connected component (px) counted as a blob."""
    max_link_fraction: float = 1 / 6
    """Largest frame-to-frame displacement linked into a track, as a fraction of the frame width."""
    max_lag: int = 4
    """Largest lag (frames) in the mean squared displacement fit."""


@dataclass
class Blobs:
    """Blobs of one frame."""

    centroids: np.ndarray
    """Intensity-weighted centres ``(K, 2)`` as x, y."""
    areas: np.ndarray
    """Areas in pixels ``(K,)``."""


@dataclass
class Measurement:
    """What the analysers measured from one video (lengths in px, time in frames)."""

    counts: list[int]
    """Blob count per frame."""
    areas: list[float]
    """Total foreground area per frame."""
    velocity: tuple[float, float]
    """Median frame-to-frame displacement of linked blobs (x right, y down)."""
    flow_velocity: tuple[float, float]
    """Mean Farneback optical flow over foreground pixels (cross-check of ``velocity``)."""
    diffusion_coefficient: float
    """MSD slope / 4 after removing the drift ``velocity`` (nan without tracks of length > 1)."""
    n_links: int
    """Number of frame-to-frame links."""
    drift_toward_source: float | None = None
    """Mean displacement per frame projected on the direction to the source (when one is given)."""


def load_video(source: np.ndarray | str | Path) -> np.ndarray:
    """Frames as ``uint8`` ``(T, H, W, 3)`` from an array (uint8, or float in [0, 1]) or a video file."""
    if isinstance(source, (str, Path)):
        import imageio.v3 as iio

        source = iio.imread(str(source), plugin="pyav")
    frames = np.asarray(source)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=-1)
    return frames


def foreground(frames: np.ndarray, cfg: AnalysisConfig | None = None) -> np.ndarray:
    """``(T, H, W)`` float32 absolute deviation of each frame from its median, blurred."""
    cfg = cfg or AnalysisConfig()
    gray = frames.astype(np.float32).mean(axis=-1)
    dev = np.abs(gray - np.median(gray, axis=(1, 2), keepdims=True))
    return np.stack([cv2.GaussianBlur(f, (0, 0), cfg.blur_sigma) for f in dev])


def threshold(fg: np.ndarray, cfg: AnalysisConfig | None = None) -> float:
    """One foreground threshold for a whole video: relative to its brightest blobs, above its noise."""
    cfg = cfg or AnalysisConfig()
    return float(max(cfg.rel_threshold * np.percentile(fg, 99.9), cfg.noise_factor * np.median(fg), 1.0))


def detect_blobs(frames: np.ndarray, cfg: AnalysisConfig | None = None) -> tuple[list[Blobs], np.ndarray]:
    """Blobs of every frame, and the foreground masks ``(T, H, W)`` bool."""
    cfg = cfg or AnalysisConfig()
    return blobs_from_foreground(foreground(frames, cfg), cfg)


def blobs_from_foreground(fg: np.ndarray, cfg: AnalysisConfig | None = None) -> tuple[list[Blobs], np.ndarray]:
    """``detect_blobs`` on a precomputed ``foreground`` map."""
    cfg = cfg or AnalysisConfig()
    masks = fg > threshold(fg, cfg)
    yy, xx = np.mgrid[0 : fg.shape[1], 0 : fg.shape[2]]
    out = []
    for f, m in zip(fg, masks):
        n, labels, stats, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
        keep = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] >= cfg.min_area) + 1
        lab = labels.ravel()
        w = np.bincount(lab, f.ravel(), n)
        cx = np.bincount(lab, (f * xx).ravel(), n) / np.maximum(w, 1e-9)
        cy = np.bincount(lab, (f * yy).ravel(), n) / np.maximum(w, 1e-9)
        out.append(Blobs(np.stack([cx[keep], cy[keep]], axis=1), stats[keep, cv2.CC_STAT_AREA].astype(float)))
    return out, masks


def link_tracks(blobs: Sequence[Blobs], max_distance: float) -> list[np.ndarray]:
    """Greedy nearest-neighbour linking; returns tracks as ``(n, 3)`` arrays of (frame, x, y)."""
    tracks = [[(0.0, x, y)] for x, y in blobs[0].centroids] if blobs else []
    owner = {i: i for i in range(len(tracks))}
    for t in range(1, len(blobs)):
        prev, cur = blobs[t - 1].centroids, blobs[t].centroids
        new_owner: dict[int, int] = {}
        if len(prev) and len(cur):
            d = np.linalg.norm(prev[:, None, :] - cur[None, :, :], axis=-1)
            used_p, used_c = set(), set()
            for flat in np.argsort(d, axis=None):
                p, c = divmod(int(flat), d.shape[1])
                if d[p, c] > max_distance:
                    break
                if p in used_p or c in used_c:
                    continue
                used_p.add(p)
                used_c.add(c)
                new_owner[c] = owner[p]
        for c, (x, y) in enumerate(cur):
            if c not in new_owner:
                new_owner[c] = len(tracks)
                tracks.append([])
            tracks[new_owner[c]].append((t, x, y))
        owner = new_owner
    return [np.asarray(tr, float) for tr in tracks if len(tr) > 1]


def _links(tracks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Start positions ``(L, 2)`` and displacements ``(L, 2)`` of all frame-to-frame links."""
    if not tracks:
        return np.zeros((0, 2)), np.zeros((0, 2))
    starts = np.concatenate([tr[:-1, 1:] for tr in tracks])
    steps = np.concatenate([np.diff(tr[:, 1:], axis=0) for tr in tracks])
    return starts, steps


def msd_diffusion(tracks: Sequence[np.ndarray], drift: np.ndarray, max_lag: int = 4) -> float:
    """Diffusion coefficient (px^2/frame): slope / 4 of the drift-corrected MSD over lags 1..max_lag.

    The MSD at each lag is estimated robustly as median(|d|^2) / ln 2 (exact for Brownian motion).
    """
    lags, msd = [], []
    for lag in range(1, max_lag + 1):
        sq = [np.sum((tr[lag:, 1:] - tr[:-lag, 1:] - lag * drift) ** 2, axis=1) for tr in tracks if len(tr) > lag]
        if sq:  # median / ln 2 is the mean of a 2-D Gaussian |d|^2, robust to merge/split jumps
            lags.append(lag)
            msd.append(float(np.median(np.concatenate(sq)) / math.log(2)))
    if not lags:
        return float("nan")
    lag_arr, msd_arr = np.asarray(lags, float), np.asarray(msd)
    return float(lag_arr @ msd_arr / (lag_arr @ lag_arr) / 4)  # MSD = 4 D lag, fitted through the origin


def optical_flow_velocity(fg: np.ndarray, masks: np.ndarray) -> tuple[float, float]:
    """Mean Farneback flow (px/frame) of a ``foreground`` map over pixels that are foreground in the earlier frame."""
    img = np.clip(fg * (255.0 / max(float(fg.max()), 1e-6)), 0, 255).astype(np.uint8)
    total, n = np.zeros(2), 0
    for t in range(len(img) - 1):
        if not masks[t].any():
            continue
        flow = cv2.calcOpticalFlowFarneback(img[t], img[t + 1], None, 0.5, 3, 9, 3, 5, 1.1, 0)
        total += flow[masks[t]].sum(axis=0)
        n += int(masks[t].sum())
    return (float(total[0] / n), float(total[1] / n)) if n else (0.0, 0.0)


def analyse(
    video: np.ndarray | str | Path, source: Sequence[float] | None = None, cfg: AnalysisConfig | None = None
) -> Measurement:
    """Run every analyser on a video; ``source`` (x, y in px) enables the drift-toward-source measure."""
    cfg = cfg or AnalysisConfig()
    frames = load_video(video)
    fg = foreground(frames, cfg)
    blobs, masks = blobs_from_foreground(fg, cfg)
    tracks = link_tracks(blobs, cfg.max_link_fraction * frames.shape[2])
    starts, steps = _links(tracks)
    velocity = np.median(steps, axis=0) if len(steps) else np.zeros(2)
    drift = None
    if source is not None and len(steps):
        to_src = np.asarray(source, float) - starts
        drift = float(np.mean(np.sum(steps * to_src, axis=1) / np.maximum(np.linalg.norm(to_src, axis=1), 1e-6)))
    return Measurement(
        counts=[len(b.centroids) for b in blobs],
        areas=[float(b.areas.sum()) for b in blobs],
        velocity=(float(velocity[0]), float(velocity[1])),
        flow_velocity=optical_flow_velocity(fg, masks),
        diffusion_coefficient=msd_diffusion(tracks, velocity, cfg.max_lag),
        n_links=len(steps),
        drift_toward_source=drift,
    )


# ----------------------------------------------------------------------------------------------
# per-process checks against ground truth


@dataclass
class Tolerances:
    """Pass criteria of the per-process checks (lengths scale with frame width / 64)."""

    max_drift: float = 0.75
    """Diffusion: largest |median velocity| (px/frame at 64 px) still counted as undirected."""
    diffusion_factor: float = 2.0
    """Diffusion: measured coefficient must be within this factor of the truth."""
    direction_deg: float = 30.0
    """Flow and transport: largest angle between measured and true direction."""
    speed_rel: float = 0.35
    """Flow and transport: largest relative speed error."""
    flow_direction_deg: float = 45.0
    """Flow and transport: largest angle between the optical-flow cross-check and the true direction."""
    min_links: int = 16
    """Tracking-based checks need at least this many frame-to-frame links (one blob over 17 frames)."""
    min_source_drift: float = 0.2
    """Chemotaxis: smallest drift toward the source (px/frame at 64 px)."""
    max_area_ratio: float = 0.8
    """Apoptosis: largest late/early foreground-area ratio still counted as shrinking."""


def _mode(values: Sequence[int]) -> int:
    return int(np.bincount(np.asarray(values, int)).argmax()) if len(values) else 0


def _angle_deg(v: np.ndarray, u: np.ndarray) -> float:
    """Angle between ``v`` and unit vector ``u`` in degrees (180 for a zero ``v``)."""
    norm = float(np.linalg.norm(v))
    return math.degrees(math.acos(float(np.clip(v @ u / norm, -1, 1)))) if norm > 0 else 180.0


def check_process(
    process: str, params: dict, m: Measurement, scale: float = 1.0, tol: Tolerances | None = None
) -> tuple[bool, dict]:
    """Whether ``m`` shows what ``params`` (a simulator clip's parameters) prescribe; and the key numbers.

    ``scale`` is the video width over the simulated width (truth lengths are multiplied by it).
    The returned dict always has ``measured`` and ``truth``: the process's primary quantity.
    """
    tol = tol or Tolerances()
    n = len(m.counts)
    q = max(n // 4, 2)
    early, late = _mode(m.counts[:q]), _mode(m.counts[-q:])
    v = np.asarray(m.velocity)
    s = scale
    tracked = m.n_links >= tol.min_links
    if process == "diffusion":
        d_true = params["diffusion_coefficient"] * s * s
        d = m.diffusion_coefficient
        ok_d = bool(np.isfinite(d) and d_true / tol.diffusion_factor <= d <= d_true * tol.diffusion_factor)
        drift = float(np.linalg.norm(v))
        return tracked and ok_d and drift < tol.max_drift * s, {"measured": d, "truth": d_true, "drift": drift}
    if process == "mitosis":
        return early == 1 and late == 2, {"measured": late, "truth": 2, "early_count": early}
    if process in ("blood_flow", "vesicle_transport"):
        u = np.asarray(DIRECTIONS[params["direction"]])
        speed_true = params["velocity"] * s
        speed = float(np.linalg.norm(v))
        angle, flow_angle = _angle_deg(v, u), _angle_deg(np.asarray(m.flow_velocity), u)
        ok = tracked and angle <= tol.direction_deg and abs(speed - speed_true) <= tol.speed_rel * speed_true
        ok = ok and flow_angle <= tol.flow_direction_deg
        metrics = {"measured": float(v @ u), "truth": speed_true, "angle_deg": angle, "flow_angle_deg": flow_angle}
        return ok, {**metrics, "flow_along": float(np.dot(m.flow_velocity, u))}
    if process == "chemotaxis":
        drift = m.drift_toward_source if m.drift_toward_source is not None else float("nan")
        ok = tracked and bool(np.isfinite(drift) and drift >= tol.min_source_drift * s)
        return ok, {"measured": drift, "truth": params["drift_toward_source"] * s}
    if process == "apoptosis":
        a = np.asarray(m.areas)
        ratio = float(a[-q:].mean() / a[:q].mean()) if a[:q].mean() > 0 else float("nan")
        ok = early == 1 and bool(ratio <= tol.max_area_ratio)
        return ok, {"measured": ratio, "truth": params["shrink_factor"] ** 2, "early_count": early}
    raise KeyError(f"unknown process {process!r}")


# ----------------------------------------------------------------------------------------------
# evaluation over held-out prompts


@dataclass
class PhysicsCase:
    """One held-out prompt with the simulator parameters it stands for."""

    id: str
    """Case id."""
    process: str
    """Simulator process."""
    prompt: str
    """Caption given to the generator."""
    seed: int
    """Seed given to the generator (and the simulator seed of the reference clip)."""
    params: dict
    """Simulator parameters (the ground truth the checks compare with)."""
    size: int = 64
    """Frame width the parameters refer to."""
    frames: int = 17
    """Frames of the reference clip."""
    looks: tuple[str, ...] = LOOKS
    """Looks the reference clip's look was drawn from (part of its recipe, like the seed)."""


@dataclass
class CaseResult:
    """Outcome of one case."""

    id: str
    """Case id."""
    process: str
    """Simulator process."""
    prompt: str
    """Caption."""
    seed: int
    """Seed."""
    passed: bool
    """Whether the check passed."""
    metrics: dict = field(default_factory=dict)
    """Key numbers (``measured``, ``truth`` and process-specific ones)."""
    error: str | None = None
    """Why the video could not be generated or analysed, if it could not."""


@dataclass
class PhysicsReport:
    """Results of one video source over a set of cases."""

    label: str
    """Name of the source (e.g. ``simulator``, a model path)."""
    results: list[CaseResult]
    """One result per case."""
    acceptance: dict[str, dict] = field(default_factory=dict)
    """Results of ``acceptance_checks`` for this source, when run."""

    def accuracy(self) -> dict[str, float]:
        """Fraction of passed cases per process, plus ``overall``."""
        acc: dict[str, float] = {}
        for proc in dict.fromkeys(r.process for r in self.results):
            rs = [r for r in self.results if r.process == proc]
            acc[proc] = sum(r.passed for r in rs) / len(rs)
        if self.results:
            acc["overall"] = sum(r.passed for r in self.results) / len(self.results)
        return acc

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        results = [asdict(r) for r in self.results]
        return {"label": self.label, "accuracy": self.accuracy(), "acceptance": self.acceptance, "results": results}


def heldout_cases(
    n_per_process: int = 10,
    seed: int = HELDOUT_SEED,
    size: int = 64,
    frames: int = 17,
    processes: Sequence[str] | None = None,
    looks: Sequence[str] = LOOKS,
) -> list[PhysicsCase]:
    """Held-out simulator prompts: ``n_per_process`` clips of each process, in ``looks``, with seeds from ``seed``."""
    processes = list(processes or PROCESSES)
    cases = []
    for i, s in enumerate(clip_seeds(seed, n_per_process * len(processes))):
        proc = processes[i % len(processes)]
        clip = render_clip(proc, s, size, frames, looks)
        case_id = f"{proc}_{i // len(processes):04d}"
        cases.append(PhysicsCase(case_id, proc, clip.prompt, s, clip.params, size, frames, tuple(looks)))
    return cases


def simulator_generate(cases: Sequence[PhysicsCase]) -> Generate:
    """The ceiling: ``generate`` returning the real simulator clip of each case."""
    by_key = {(c.prompt, c.seed): c for c in cases}

    def generate(prompt: str, seed: int) -> np.ndarray:
        c = by_key[(prompt, seed)]
        return render_clip(c.process, c.seed, c.size, c.frames, c.looks).frames

    return generate


def load_vae(path: str | Path):
    """``AutoencoderKLWan`` from a VAE folder, or a pipeline folder or Hugging Face id with a ``vae`` subfolder."""
    from diffusers import AutoencoderKLWan

    subfolder = None if (Path(path) / "config.json").is_file() else "vae"
    return AutoencoderKLWan.from_pretrained(str(path), subfolder=subfolder).eval()


def through_vae(generate: Generate, vae) -> Generate:
    """``generate`` followed by an ``AutoencoderKLWan`` encode and decode (the posterior mean).

    Wrapping the simulator gives the reconstruction ceiling: no model decoding with that VAE can show
    what the reconstruction already loses. ``vae`` is a loaded VAE or a path for :func:`load_vae`.
    """
    import torch

    if isinstance(vae, (str, Path)):
        vae = load_vae(vae)

    def reconstruct(prompt: str, seed: int) -> np.ndarray:
        frames = load_video(generate(prompt, seed))
        x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].to(vae.dtype) / 127.5 - 1
        with torch.no_grad():
            rec = vae(x, sample_posterior=False).sample[0].float().clamp(-1, 1)
        return ((rec.permute(1, 2, 3, 0).numpy() + 1) * 127.5).round().astype(np.uint8)

    return reconstruct


def wan_generate(
    model_path: str | Path, size: int = 64, frames: int = 17, steps: int = 20, guidance_scale: float = 5.0
) -> Generate:
    """``generate`` from a checkpoint folder through the serving engine (``microverse.engine``).

    The same loading, settings and code path as the service, so the metrics measure what users get.
    """
    from microverse.config import Settings
    from microverse.engine import DiffusersEngine
    from microverse.schemas import GenerationSpec

    engine = DiffusersEngine.from_settings(Settings(model=str(model_path)))
    negative = engine.model.defaults.negative_prompt

    def generate(prompt: str, seed: int) -> np.ndarray:
        spec = GenerationSpec(prompt=prompt, negative_prompt=negative, height=size, width=size, num_frames=frames,
                              num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed, fps=16)
        return engine.generate([spec]).videos[0]

    return generate


def folder_cases(videos_dir: str | Path) -> tuple[list[PhysicsCase], Generate]:
    """Cases and a ``generate`` reading ``videos_dir/metadata.json`` (the format ``write_dataset`` writes)."""
    root = Path(videos_dir)
    entries = json.loads((root / "metadata.json").read_text())
    cases, paths = [], {}
    for e in entries:
        c = PhysicsCase(
            e["id"],
            e["process"],
            e["prompt"],
            int(e.get("seed", 0)),
            e["params"],
            e.get("size", 64),
            e.get("frames", 17),
        )
        cases.append(c)
        paths[(c.prompt, c.seed)] = root / e["video"]
    return cases, lambda prompt, seed: load_video(paths[(prompt, seed)])


def evaluate_physics(
    generate: Generate,
    cases: Sequence[PhysicsCase],
    label: str = "model",
    cfg: AnalysisConfig | None = None,
    tol: Tolerances | None = None,
) -> PhysicsReport:
    """Generate a video for every case with ``generate(prompt, seed)``, analyse it and check it."""
    results = []
    for c in tqdm(cases, desc=f"physics[{label}]", unit="video", disable=len(cases) < 12):
        try:
            frames = load_video(generate(c.prompt, c.seed))
            scale = frames.shape[2] / c.size
            source = np.asarray(c.params["source"]) * scale if "source" in c.params else None
            passed, metrics = check_process(c.process, c.params, analyse(frames, source, cfg), scale, tol)
            results.append(CaseResult(c.id, c.process, c.prompt, c.seed, bool(passed), metrics))
        except Exception as exc:  # noqa: BLE001 - a broken generation is a failed case, not a crashed report
            logger.warning("case %s failed: %s", c.id, exc)
            results.append(CaseResult(c.id, c.process, c.prompt, c.seed, False, error=repr(exc)))
    return PhysicsReport(label, results)


ACCEPTANCE_PROMPTS = {
    "mitosis": "a cell divides into two daughter cells",
    "diffusing": "particles diffusing",
    "flowing_right": "red blood cells flowing to the right",
}
"""The prompts of issue 5's acceptance checks."""
ACCEPTANCE_REQUIRED = {"mitosis_one_then_two": 7, "diffusing_vs_flowing_right": 8}
"""Seeds out of 10 each acceptance check must pass."""


def acceptance_checks(
    generate: Generate, seeds: Sequence[int] = range(10), tol: Tolerances | None = None
) -> dict[str, dict]:
    """Issue 5's acceptance checks on ``generate``, one video per prompt and seed.

    ``mitosis_one_then_two``: the mitosis prompt shows 1 cell early and 2 late.
    ``diffusing_vs_flowing_right``: the diffusing video has no drift (|v| < ``max_drift``) while the
    flowing-right video drifts right (v_x >= ``max_drift``, within ``direction_deg`` of +x).
    Returns per check: ``passed`` seeds, ``n``, ``required`` (scaled to ``n``) and ``ok``.
    """
    tol = tol or Tolerances()
    right = np.array([1.0, 0.0])
    mitosis = drift = 0
    for seed in seeds:
        m = analyse(generate(ACCEPTANCE_PROMPTS["mitosis"], seed))
        q = max(len(m.counts) // 4, 2)
        mitosis += _mode(m.counts[:q]) == 1 and _mode(m.counts[-q:]) == 2
        d_frames = load_video(generate(ACCEPTANCE_PROMPTS["diffusing"], seed))
        s = d_frames.shape[2] / 64
        vd = np.asarray(analyse(d_frames).velocity)
        vf = np.asarray(analyse(generate(ACCEPTANCE_PROMPTS["flowing_right"], seed)).velocity)
        drift += bool(
            np.linalg.norm(vd) < tol.max_drift * s
            and vf[0] >= tol.max_drift * s
            and _angle_deg(vf, right) <= tol.direction_deg
        )
    n = len(seeds)
    out = {}
    for name, passed in (("mitosis_one_then_two", mitosis), ("diffusing_vs_flowing_right", drift)):
        required = math.ceil(ACCEPTANCE_REQUIRED[name] * n / 10)
        out[name] = {"passed": int(passed), "n": n, "required": required, "ok": passed >= required}
    return out


def simulator_prompt_generate(size: int = 64, frames: int = 17) -> Generate:
    """``generate`` rendering a simulator clip for any prompt (see ``training.simulator.simulate_prompt``)."""
    return lambda prompt, seed: simulate_prompt(prompt, seed, size, frames).frames


# ----------------------------------------------------------------------------------------------
# report


PRIMARY = {
    "diffusion": "diffusion coefficient (px²/frame)",
    "mitosis": "late blob count",
    "blood_flow": "speed along direction (px/frame)",
    "chemotaxis": "drift toward source (px/frame)",
    "vesicle_transport": "speed along direction (px/frame)",
    "apoptosis": "late/early area ratio",
}
"""Primary measured quantity of each process (the ``measured``/``truth`` pair of its check)."""


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.median(finite)) if finite else float("nan")


def write_report(reports: Sequence[PhysicsReport], out_dir: str | Path) -> dict[str, Path]:
    """Write ``physics_report.md``, ``physics_report.json``, ``accuracy.png`` and ``measurements.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    procs = list(dict.fromkeys(r.process for rep in reports for r in rep.results))
    accs = [rep.accuracy() for rep in reports]

    def cell(rep: PhysicsReport, proc: str) -> str:
        rs = [r for r in rep.results if proc in ("overall", r.process)]
        return (
            f"{sum(r.passed for r in rs)}/{len(rs)} ({100 * sum(r.passed for r in rs) / len(rs):.0f}%)" if rs else "–"
        )

    lines = ["# Physics metrics", "", "Per-process accuracy against simulator ground truth.", ""]
    lines.append("| process | " + " | ".join(rep.label for rep in reports) + " |")
    lines.append("|---|" + "---|" * len(reports))
    for proc in [*procs, "overall"]:
        lines.append(f"| {proc} | " + " | ".join(cell(rep, proc) for rep in reports) + " |")
    lines += ["", "Median measured / median truth of each process's primary quantity.", ""]
    lines.append("| process | quantity | " + " | ".join(rep.label for rep in reports) + " |")
    lines.append("|---|---|" + "---|" * len(reports))
    for proc in procs:
        vals = []
        for rep in reports:
            rs = [r.metrics for r in rep.results if r.process == proc and "measured" in r.metrics]
            vals.append(f"{_median([m['measured'] for m in rs]):.3g} / {_median([m['truth'] for m in rs]):.3g}")
        lines.append(f"| {proc} | {PRIMARY[proc]} | " + " | ".join(vals) + " |")
    with_acc = [rep for rep in reports if rep.acceptance]
    if with_acc:
        lines += ["", "Issue 5 acceptance checks (seeds passed / required).", ""]
        lines.append("| check | " + " | ".join(rep.label for rep in with_acc) + " |")
        lines.append("|---|" + "---|" * len(with_acc))
        for name in ACCEPTANCE_REQUIRED:
            vals = [rep.acceptance[name] for rep in with_acc]
            cells = [f"{v['passed']}/{v['n']} (need {v['required']}) {'✓' if v['ok'] else '✗'}" for v in vals]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    errors = [(rep.label, r.id, r.error) for rep in reports for r in rep.results if r.error]
    if errors:
        lines += ["", f"{len(errors)} case(s) failed to generate or analyse; first: `{errors[0]}`"]
    paths = {"markdown": out / "physics_report.md", "json": out / "physics_report.json"}
    paths["markdown"].write_text("\n".join(lines) + "\n")
    paths["json"].write_text(json.dumps({"sources": [rep.to_dict() for rep in reports]}, indent=1, default=float))

    fig, ax = plt.subplots(figsize=(1.2 + 1.3 * len(procs), 3.5))
    width = 0.8 / max(len(reports), 1)
    for k, (rep, acc) in enumerate(zip(reports, accs)):
        ax.bar(np.arange(len(procs)) + k * width, [acc.get(p, 0) for p in procs], width, label=rep.label)
    ax.set_xticks(np.arange(len(procs)) + width * (len(reports) - 1) / 2, procs, rotation=20, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title("physics accuracy")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    paths["accuracy_plot"] = out / "accuracy.png"
    fig.savefig(paths["accuracy_plot"], dpi=100)
    plt.close(fig)

    cols = min(3, len(procs))
    rows = math.ceil(len(procs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3 * rows), squeeze=False)
    for ax, proc in zip(axes.ravel(), procs):
        for rep in reports:
            rs = [r.metrics for r in rep.results if r.process == proc and "measured" in r.metrics]
            ax.scatter([m["truth"] for m in rs], [m["measured"] for m in rs], s=14, label=rep.label, alpha=0.7)
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], "k:", lw=0.8)
        ax.set_title(proc, fontsize=9)
        ax.set_xlabel("truth", fontsize=8)
        ax.set_ylabel(PRIMARY[proc], fontsize=7)
    for ax in axes.ravel()[len(procs) :]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=7)
    fig.tight_layout()
    paths["measurements_plot"] = out / "measurements.png"
    fig.savefig(paths["measurements_plot"], dpi=100)
    plt.close(fig)
    return paths


@click.command("physics")
@click.option(
    "--source", "sources", type=click.Choice(["simulator"]), multiple=True, help="Real simulator clips (the ceiling)."
)
@click.option(
    "--videos",
    "videos_dirs",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    multiple=True,
    help="Folder of mp4 clips with a metadata.json of prompts, process and params (write_dataset format).",
)
@click.option(
    "--model",
    "models",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    multiple=True,
    help="Checkpoint folder run through the serving engine (e.g. an untrained model: the floor).",
)
@click.option(
    "--vae",
    "vaes",
    multiple=True,
    help="VAE folder, or pipeline folder / Hugging Face id with a vae/ subfolder: the simulator clips "
    "through its encode and decode (the reconstruction ceiling of models using it).",
)
@click.option(
    "--n-per-process",
    type=int,
    default=10,
    show_default=True,
    help="Held-out cases per process (simulator and model sources).",
)
@click.option("--seed", type=int, default=HELDOUT_SEED, show_default=True, help="Base seed of the held-out cases.")
@click.option("--size", type=int, default=64, show_default=True, help="Frame width and height.")
@click.option("--frames", type=int, default=17, show_default=True, help="Frames per video.")
@click.option("--processes", default=None, help="Comma-separated subset of processes.")
@click.option("--steps", type=int, default=20, show_default=True, help="Denoising steps for --model.")
@click.option(
    "--guidance-scale", type=float, default=5.0, show_default=True, help="Classifier-free guidance for --model."
)
@click.option(
    "--acceptance-seeds",
    type=int,
    default=10,
    show_default=True,
    help="Seeds of issue 5's acceptance checks for simulator and model sources (0: skip).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("physics_eval"),
    show_default=True,
)
def physics_command(
    sources,
    videos_dirs,
    models,
    vaes,
    n_per_process,
    seed,
    size,
    frames,
    processes,
    steps,
    guidance_scale,
    acceptance_seeds,
    out_dir,
):
    """Physics-grounded metrics: per-process accuracy of videos against simulator ground truth."""
    if not (sources or videos_dirs or models or vaes):
        sources = ("simulator",)
    procs = parse_processes(processes)
    seeds = range(acceptance_seeds)
    reports = []
    if sources or models or vaes:
        cases = heldout_cases(n_per_process, seed, size, frames, procs)
        generators = (
            [("simulator", simulator_generate(cases), simulator_prompt_generate(size, frames))] if sources else []
        )
        for path in vaes:
            vae = load_vae(path)
            prompt_gen = through_vae(simulator_prompt_generate(size, frames), vae)
            generators.append((f"vae:{Path(path).name}", through_vae(simulator_generate(cases), vae), prompt_gen))
        for path in models:
            gen = wan_generate(path, size, frames, steps, guidance_scale)
            generators.append((f"model:{path.name}", gen, gen))
        for label, gen, prompt_gen in generators:
            report = evaluate_physics(gen, cases, label)
            if acceptance_seeds:
                report.acceptance = acceptance_checks(prompt_gen, seeds)
            reports.append(report)
    for folder in videos_dirs:
        cases, gen = folder_cases(folder)
        if procs:
            cases = [c for c in cases if c.process in procs]
        reports.append(evaluate_physics(gen, cases, f"videos:{folder.name}"))
    paths = write_report(reports, out_dir)
    click.echo(paths["markdown"].read_text())
    click.echo(f"report written to {out_dir}")


if __name__ == "__main__":
    physics_command()
