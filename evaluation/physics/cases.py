"""Physics checks against simulator ground truth: per-process pass criteria, held-out cases, the
evaluation of a ``generate(prompt, seed) -> frames`` callable over them, and issue 5's acceptance checks.

``check_process`` compares a :class:`~simulator.analysis.Measurement` with a simulator clip's parameters;
``evaluate_physics`` runs held-out simulator prompts through any ``generate`` and reports per-process
accuracy; ``acceptance_checks`` runs the two fixed-prompt checks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from simulator.analysis import AnalysisConfig, Measurement, analyse, load_video
from simulator.render import DIRECTIONS, LOOKS, PROCESSES, clip_seeds, render_clip

logger = logging.getLogger(__name__)

HELDOUT_SEED = 20_251_126
"""Base seed of the held-out evaluation clips (training datasets use small seeds such as 0)."""

#: ``generate(prompt, seed)`` returns frames ``(T, H, W, 3)`` uint8 (or float in [0, 1]) or an mp4 path.
Generate = Callable[[str, int], "np.ndarray | str | Path"]


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
        except Exception as exc:  # a broken generation is a failed case, not a crashed report
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
