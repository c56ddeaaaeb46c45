"""The procedural micro-world: microscopy-like clips of microscale processes with known ground truth.

Each process (``PROCESSES``) samples its parameters from a seeded ``numpy.random.Generator``, moves
its objects for ``frames`` steps, renders them with a fluorescence look (dark background, glowing
Gaussian-PSF blobs, shot noise) or a brightfield look (light background, dark-edged cells), and
returns the frames as ``uint8`` ``(T, H, W, 3)`` together with a caption, the parameters and the
per-frame ground truth (positions, counts, radii). Lengths are in pixels of the rendered size and
velocities in pixels per frame; everything is vectorised over frames and objects with numpy.

``render_clip`` renders one clip of a process from a seed; ``simulate_prompt`` renders a clip for a
free-form prompt (process, direction, look... parsed from its words). Datasets: ``simulator.dataset``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

#: Every word any caption can contain (lowercase, punctuation stripped), for the demo tokenizer.
CAPTION_VOCAB: tuple[str, ...] = (
    "a",
    "along",
    "an",
    "and",
    "apoptosis",
    "apoptotic",
    "at",
    "bacteria",
    "bacterial",
    "blebbing",
    "blood",
    "bottom",
    "brightfield",
    "brownian",
    "capillary",
    "cell",
    "cells",
    "chemical",
    "chemotaxis",
    "daughter",
    "diffusing",
    "diffusion",
    "divides",
    "dividing",
    "down",
    "dying",
    "fast",
    "filament",
    "flow",
    "flowing",
    "fluorescence",
    "in",
    "into",
    "left",
    "membrane",
    "microscopy",
    "microtubule",
    "mitosis",
    "molecules",
    "motion",
    "moving",
    "of",
    "on",
    "one",
    "particles",
    "red",
    "right",
    "shrinking",
    "shrinks",
    "slow",
    "source",
    "swimming",
    "that",
    "the",
    "through",
    "to",
    "top",
    "toward",
    "transport",
    "two",
    "up",
    "vesicle",
    "vesicles",
    "vessel",
    "video",
    "with",
)

LEVELS = {
    "diffusion": "Subcellular-level",
    "mitosis": "Cellular-level",
    "blood_flow": "Organ-level",
    "chemotaxis": "Cellular-level",
    "vesicle_transport": "Subcellular-level",
    "apoptosis": "Cellular-level",
}
"""MicroWorldBench level of each process."""

#: Unit vectors (x right, y down) of the direction words.
DIRECTIONS: dict[str, tuple[float, float]] = {
    "right": (1.0, 0.0),
    "left": (-1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
SIDE_WORDS = {"right": "on the right", "left": "on the left", "up": "at the top", "down": "at the bottom"}
"""Caption phrase of each source side (chemotaxis)."""
DIRECTION_WORDS = {"right": "to the right", "left": "to the left", "up": "up", "down": "down"}
"""Caption phrase of each direction of motion."""


@dataclass
class Clip:
    """One rendered clip and everything known about it."""

    process: str
    """Registry name of the process."""
    seed: int
    """Seed that reproduces this clip exactly."""
    frames: np.ndarray
    """``uint8`` frames ``(T, H, W, 3)``."""
    prompt: str
    """Caption."""
    params: dict
    """Sampled parameters (JSON-serialisable); includes ``look``."""
    truth: dict = field(default_factory=dict)
    """Per-frame ground truth as numpy arrays (e.g. ``positions`` ``(T, N, 2)`` as x, y; ``counts`` ``(T,)``)."""

    @property
    def level(self) -> str:
        """MicroWorldBench level (Cellular-level, Subcellular-level or Organ-level)."""
        return LEVELS[self.process]


@dataclass
class _Layer:
    """Gaussian blobs to draw: centres ``pos`` (T, K, 2), sigmas ``sig`` (T, K, 2), peak ``amp`` (T, K)."""

    pos: np.ndarray
    sig: np.ndarray
    amp: np.ndarray


@dataclass
class _Scene:
    """What a process hands to the renderer."""

    layers: list[_Layer]
    """Moving objects."""
    static: np.ndarray | None
    """Faint static structure ``(H, W)`` (vessel, filament, chemical gradient), in signal units."""
    params: dict
    """Sampled parameters."""
    truth: dict
    """Per-frame ground truth."""
    tint: tuple[float, float, float] = (0.35, 1.0, 0.45)
    """Fluorescence emission colour (RGB gains)."""
    absorb: tuple[float, float, float] = (1.0, 1.0, 0.95)
    """Brightfield absorption per RGB channel (reddish objects absorb green and blue)."""


# ----------------------------------------------------------------------------------------------
# rendering


def _gauss_1d(centres: np.ndarray, sig: np.ndarray, n: int) -> np.ndarray:
    """``exp(-(x - c)^2 / 2 s^2)`` on ``x = 0..n-1``; centres/sig ``(T, K)`` -> ``(T, K, n)``."""
    x = np.arange(n, dtype=np.float32)
    d = (x - centres[..., None].astype(np.float32)) / sig[..., None].astype(np.float32)
    return np.exp(-0.5 * d * d)


LOOKS = ("fluorescence", "brightfield")
"""The rendering looks: dark background with glowing blobs, or light background with dark-edged cells."""


def check_looks(looks: Sequence[str]) -> None:
    """Raise ``KeyError`` naming unknown looks (or none given)."""
    unknown = sorted(set(looks) - set(LOOKS))
    if unknown or not looks:
        raise KeyError(f"unknown looks {unknown or list(looks)}; choose from {list(LOOKS)}")


#: Each look draws every blob as a weighted sum of Gaussians: (sigma scale, weight).
_PROFILES = {
    "fluorescence": ((1.0, 0.7), (0.5, 0.3)),  # PSF-blurred body with a brighter core
    "brightfield": ((1.0, 2.2), (0.7, -1.75)),  # dark rim (outer minus inner) on a slightly darker body
}


def _signal(layers: Sequence[_Layer], look: str, size: int) -> np.ndarray:
    """Sum of all blobs of all layers in the look's profile, ``(T, H, W)`` float32, as one batched matmul."""
    gx, gy = [], []
    for layer in layers:
        for scale, weight in _PROFILES[look]:
            gx.append(_gauss_1d(layer.pos[..., 0], layer.sig[..., 0] * scale, size))
            amp = (weight * layer.amp[..., None]).astype(np.float32)
            gy.append(_gauss_1d(layer.pos[..., 1], layer.sig[..., 1] * scale, size) * amp)
    return np.matmul(np.concatenate(gy, axis=1).transpose(0, 2, 1), np.concatenate(gx, axis=1))


def _compose(scene: _Scene, look: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render a scene to uint8 RGB frames with the fluorescence or brightfield look."""
    signal = _signal(scene.layers, look, size)
    if scene.static is not None:
        signal += scene.static
    noise = rng.standard_normal(signal.shape, dtype=np.float32)
    if look == "fluorescence":  # photon counts with shot noise, then the emission colour
        photons = 8.0 + 170.0 * np.maximum(signal, 0.0)
        gray = np.clip(photons + np.sqrt(photons * 1.5) * noise, 0.0, 255.0)
        return (gray[..., None] * np.asarray(scene.tint, np.float32)).astype(np.uint8)
    dark = np.clip(150.0 * signal + 4.0 * noise, -50.0, 195.0)  # keeps every channel in 0..255
    img = np.asarray([195.0, 200.0, 205.0], np.float32) - dark[..., None] * np.asarray(scene.absorb, np.float32)
    return img.astype(np.uint8)


def _line_field(size: int, point: np.ndarray, angle: float, width: float) -> np.ndarray:
    """``(H, W)`` Gaussian ridge of half-width ``width`` along a line through ``point`` at ``angle``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    d = -(xx - point[0]) * math.sin(angle) + (yy - point[1]) * math.cos(angle)
    return np.exp(-0.5 * (d / width) ** 2)


def _reflect(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Fold coordinates into ``[lo, hi]`` as a reflecting boundary would."""
    span = hi - lo
    y = np.mod(x - lo, 2 * span)
    return lo + np.where(y > span, 2 * span - y, y)


def _full(t: int, k: int, value: float | np.ndarray) -> np.ndarray:
    return np.broadcast_to(np.asarray(value, np.float32), (t, k)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# processes


def _diffusion(rng: np.random.Generator, size: int, frames: int) -> _Scene:
    s = size / 64.0
    word = rng.choice(["slow", "fast"])
    d_coef = float(rng.uniform(0.3, 0.7) if word == "slow" else rng.uniform(1.4, 2.6)) * s * s
    n = int(rng.integers(8, 15))
    start = rng.uniform(6 * s, size - 6 * s, (1, n, 2))
    steps = rng.normal(0.0, math.sqrt(2 * d_coef), (frames - 1, n, 2))
    pos = _reflect(np.concatenate([start, start + np.cumsum(steps, axis=0)]), 1.0, size - 2.0)
    sig = np.full((frames, n, 2), 1.4 * s, np.float32)
    amp = _full(frames, n, rng.uniform(0.75, 1.0, n))
    return _Scene(
        [_Layer(pos, sig, amp)],
        None,
        {"speed": str(word), "diffusion_coefficient": round(d_coef, 4), "n_particles": n},
        {"positions": pos, "counts": np.full(frames, n)},
    )


def _mitosis(rng: np.random.Generator, size: int, frames: int) -> _Scene:
    s = size / 64.0
    r0 = rng.uniform(4.2, 4.8) * s
    rd = r0 * 0.8
    centre = size / 2 + rng.uniform(-5, 5, 2) * s
    axis = rng.uniform(0, math.pi)
    u = np.array([math.cos(axis), math.sin(axis)])
    t = np.arange(frames, dtype=np.float64)
    t_div = rng.uniform(0.3, 0.45) * (frames - 1)
    t_end = t_div + 0.3 * (frames - 1)
    final = rng.uniform(5.6, 6.2) * rd
    # cleavage: sub-blobs separate smoothly from t_div - 2 to t_end; sigma shrinks to the daughter size
    prog = np.clip((t - (t_div - 2)) / (t_end - (t_div - 2)), 0, 1)
    prog = prog * prog * (3 - 2 * prog)
    sep = final * prog
    sig_t = r0 + (rd - r0) * np.clip(prog * 2, 0, 1)
    centre_t = centre + np.cumsum(rng.normal(0, 0.15 * s, (frames, 2)), axis=0)
    pos = np.stack([centre_t + (sep / 2)[:, None] * u, centre_t - (sep / 2)[:, None] * u], axis=1)
    sig = np.repeat(sig_t[:, None, None], 2, axis=1).repeat(2, axis=2)
    amp = np.repeat((0.5 + 0.5 * np.clip(prog * 2, 0, 1))[:, None], 2, axis=1) * rng.uniform(0.85, 1.0)
    counts = np.where(sep > 3.4 * sig_t, 2, 1)
    return _Scene(
        [_Layer(pos, sig, amp)],
        None,
        {"division_frame": round(float(t_div), 2), "radius": round(float(r0), 3), "axis_angle": round(axis, 4)},
        {"positions": pos, "counts": counts, "radii": sig_t},
    )


def _flowing(
    rng: np.random.Generator, size: int, frames: int, speed: float, spacing: float, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Along-stream coordinates ``(T, n)`` of ``n`` objects in a periodic stream, and their velocities ``(n,)``."""
    length = n * spacing
    along0 = np.arange(n) * spacing + rng.uniform(-0.15, 0.15, n) * spacing
    v = speed * rng.uniform(0.95, 1.05, n)
    along = np.mod(along0[None, :] + np.arange(frames)[:, None] * v[None, :], length) - (length - size) / 2
    return along, v


def _blood_flow(rng: np.random.Generator, size: int, frames: int) -> _Scene:
    s = size / 64.0
    direction = str(rng.choice(list(DIRECTIONS)))
    word = rng.choice(["slow", "fast"])
    speed = float(rng.uniform(1.0, 1.7) if word == "slow" else rng.uniform(2.3, 3.2)) * s
    width = rng.uniform(16, 22) * s
    offset = size / 2 + rng.uniform(-8, 8) * s
    spacing = rng.uniform(13, 16) * s
    n = math.ceil((size + 3 * spacing) / spacing)
    along, v = _flowing(rng, size, frames, speed, spacing, n)
    lateral = offset + rng.uniform(-1, 1, n) * (width / 2 - 3.5 * s)
    lateral = lateral[None, :] + np.cumsum(rng.normal(0, 0.1 * s, (frames, n)), axis=0)
    dx, dy = DIRECTIONS[direction]
    if dx:
        x = along if dx > 0 else size - 1 - along
        pos = np.stack([x, lateral], axis=-1)
    else:
        y = along if dy > 0 else size - 1 - along
        pos = np.stack([lateral, y], axis=-1)
    sig = np.full((frames, n, 2), rng.uniform(2.2, 2.6) * s, np.float32)
    amp = _full(frames, n, rng.uniform(0.8, 1.0, n))
    inner = _Layer(pos, sig * 0.45, -0.35 * amp)  # biconcave dimple
    vessel = _line_field(size, np.array([offset, offset]), 0.0 if dx else math.pi / 2, width / 2.5)
    static = (0.06 * vessel).astype(np.float32)
    inside = (pos >= 0) & (pos <= size - 1)
    return _Scene(
        [_Layer(pos, sig, amp), inner],
        static,
        {"direction": direction, "speed": str(word), "velocity": round(speed, 4), "vessel_width": round(width, 3)},
        {"positions": pos, "counts": inside.all(axis=-1).sum(axis=1), "per_cell_velocity": v},
        tint=(1.0, 0.35, 0.3),
        absorb=(0.3, 1.0, 0.9),
    )


def _chemotaxis(rng: np.random.Generator, size: int, frames: int) -> _Scene:
    s = size / 64.0
    side = str(rng.choice(list(DIRECTIONS)))
    ux, uy = DIRECTIONS[side]
    source = np.array([size / 2 + ux * (size / 2 + 4 * s), size / 2 + uy * (size / 2 + 4 * s)])
    n = int(rng.integers(10, 16))
    speed = rng.uniform(1.3, 2.0) * s
    bias = rng.uniform(0.55, 0.8)  # > 0.5: every swim step has a component toward the source
    pos = np.empty((frames, n, 2))
    pos[0] = rng.uniform(5 * s, size - 5 * s, (n, 2))
    heading = rng.uniform(0, 2 * math.pi, n)
    turns = rng.normal(0, 0.35, (frames, n))
    tumble = rng.random((frames, n)) < 0.15
    new_heading = rng.uniform(0, 2 * math.pi, (frames, n))
    for t in range(1, frames):
        heading = np.where(tumble[t], new_heading[t], heading + turns[t])
        to_src = source - pos[t - 1]
        to_src /= np.linalg.norm(to_src, axis=1, keepdims=True)
        vel = (1 - bias) * np.stack([np.cos(heading), np.sin(heading)], axis=1) + bias * to_src
        vel *= speed / np.maximum(np.linalg.norm(vel, axis=1, keepdims=True), 1e-6)
        pos[t] = _reflect(pos[t - 1] + vel, 1.0, size - 2.0)
    step = np.diff(pos, axis=0)
    to_src = source - pos[:-1]
    drift = float(np.mean(np.sum(step * to_src, axis=-1) / np.linalg.norm(to_src, axis=-1)))
    # rods elongated along their motion
    vel = np.concatenate([step[:1], step])
    c = np.abs(vel[..., 0]) / np.maximum(np.linalg.norm(vel, axis=-1), 1e-6)
    base = 1.0 * s
    sig = np.stack([base * (1 + 0.7 * c), base * (1 + 0.7 * np.sqrt(1 - c * c))], axis=-1)
    amp = _full(frames, n, rng.uniform(0.8, 1.0, n))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    gradient = np.exp(-np.hypot(xx - source[0], yy - source[1]) / (size / 2.5))
    return _Scene(
        [_Layer(pos, sig, amp)],
        (0.1 * gradient).astype(np.float32),
        {
            "source_side": side,
            "source": [round(float(source[0]), 3), round(float(source[1]), 3)],
            "swim_speed": round(float(speed), 4),
            "bias": round(float(bias), 4),
            "drift_toward_source": round(drift, 4),
        },
        {"positions": pos, "counts": np.full(frames, n)},
        tint=(0.45, 1.0, 0.6),
    )


def _vesicle_transport(rng: np.random.Generator, size: int, frames: int) -> _Scene:
    s = size / 64.0
    direction = str(rng.choice(list(DIRECTIONS)))
    word = rng.choice(["slow", "fast"])
    speed = float(rng.uniform(0.8, 1.3) if word == "slow" else rng.uniform(1.9, 2.6)) * s
    dx, dy = DIRECTIONS[direction]
    tilt = rng.uniform(-0.2, 0.2)
    angle = (0.0 if dx else math.pi / 2) + tilt
    centre = size / 2 + rng.uniform(-8, 8, 2) * s
    spacing = rng.uniform(12, 16) * s
    n = math.ceil((size + 2 * spacing) / spacing)
    along, v = _flowing(rng, size, frames, speed, spacing, n)
    u = np.array([math.cos(angle), math.sin(angle)])
    pos = centre + ((along - size / 2) * (dx + dy))[..., None] * u
    pos = pos + rng.normal(0, 0.15 * s, pos.shape)
    sig = np.full((frames, n, 2), rng.uniform(1.4, 1.8) * s, np.float32)
    amp = _full(frames, n, rng.uniform(0.8, 1.0, n))
    static = (0.12 * _line_field(size, centre, angle, 0.9 * s)).astype(np.float32)
    inside = (pos >= 0) & (pos <= size - 1)
    return _Scene(
        [_Layer(pos, sig, amp)],
        static,
        {"direction": direction, "speed": str(word), "velocity": round(speed, 4), "tilt": round(float(tilt), 4)},
        {"positions": pos, "counts": inside.all(axis=-1).sum(axis=1), "per_vesicle_velocity": v},
        tint=(1.0, 0.45, 0.35),
    )


def _apoptosis(rng: np.random.Generator, size: int, frames: int) -> _Scene:
    s = size / 64.0
    r0 = rng.uniform(4.8, 5.6) * s
    shrink = rng.uniform(0.5, 0.68)
    t = np.arange(frames, dtype=np.float64)
    t0 = rng.uniform(0.1, 0.25) * (frames - 1)
    prog = np.clip((t - t0) / (0.6 * (frames - 1)), 0, 1)
    prog = prog * prog * (3 - 2 * prog)
    radius = r0 * (1 - (1 - shrink) * prog)
    centre = size / 2 + rng.uniform(-5, 5, 2) * s
    centre_t = centre + np.cumsum(rng.normal(0, 0.1 * s, (frames, 2)), axis=0)
    nb = int(rng.integers(3, 7))
    ang = rng.uniform(0, 2 * math.pi, nb)
    appear = t0 + rng.uniform(1, 0.5 * (frames - 1), nb)
    grow = np.clip((t[:, None] - appear[None, :]) / 3.0, 0, 1)  # (T, nb)
    flicker = 1 + 0.25 * np.sin(t[:, None] * rng.uniform(0.8, 1.6, nb) + rng.uniform(0, 6, nb))
    dist = radius[:, None] * 1.05 * flicker
    bleb_pos = centre_t[:, None, :] + dist[..., None] * np.stack([np.cos(ang), np.sin(ang)], -1)
    bleb_sig = np.repeat((0.3 * radius[:, None] * np.ones(nb))[..., None], 2, axis=2)
    cell = _Layer(centre_t[:, None, :], np.repeat(radius[:, None, None], 2, axis=2), np.ones((frames, 1)))
    blebs = _Layer(bleb_pos, np.maximum(bleb_sig, 0.8 * s), 0.55 * grow)
    return _Scene(
        [cell, blebs],
        None,
        {"shrink_factor": round(float(shrink), 4), "radius": round(float(r0), 3), "onset_frame": round(float(t0), 2)},
        {
            "positions": centre_t[:, None, :],
            "counts": np.ones(frames, int),
            "radii": radius,
            "blebs": (grow > 0).sum(1),
        },
    )


PROCESSES: dict[str, Callable[[np.random.Generator, int, int], _Scene]] = {
    "diffusion": _diffusion,
    "mitosis": _mitosis,
    "blood_flow": _blood_flow,
    "chemotaxis": _chemotaxis,
    "vesicle_transport": _vesicle_transport,
    "apoptosis": _apoptosis,
}
"""Registry: process name -> scene builder ``(rng, size, frames) -> _Scene``."""

TEMPLATES: dict[str, tuple[str, ...]] = {
    "diffusion": (
        "particles diffusing with {speed} brownian motion, {look} microscopy",
        "{speed} brownian diffusion of particles, {look} microscopy",
        "video of molecules diffusing, {speed} brownian motion in {look} microscopy",
    ),
    "mitosis": (
        "a cell divides into two daughter cells, {look} microscopy",
        "mitosis: one cell dividing into two daughter cells, {look} microscopy",
        "video of a cell that divides into two daughter cells in {look} microscopy",
    ),
    "blood_flow": (
        "red blood cells flowing {direction} through a capillary, {look} microscopy",
        "{speed} blood flow {direction} in a vessel, {look} microscopy",
        "red blood cells flowing {speed} {direction} in a blood vessel, {look} microscopy video",
    ),
    "chemotaxis": (
        "bacteria swimming toward a source {side}, {look} microscopy",
        "bacterial chemotaxis toward a chemical source {side}, {look} microscopy",
        "chemotaxis: bacteria moving toward the source {side} in {look} microscopy",
    ),
    "vesicle_transport": (
        "vesicles moving {direction} along a filament, {look} microscopy",
        "vesicle transport {direction} along a microtubule, {look} microscopy",
        "{speed} vesicles moving along a microtubule filament {direction}, {look} microscopy video",
    ),
    "apoptosis": (
        "a dying cell shrinking and blebbing, {look} microscopy",
        "apoptosis: a cell shrinks with membrane blebbing, {look} microscopy",
        "video of an apoptotic cell shrinking and blebbing in {look} microscopy",
    ),
}
"""Caption templates per process; fields come from the sampled parameters."""


def render_clip(process: str, seed: int, size: int = 64, frames: int = 17, looks: Sequence[str] = LOOKS) -> Clip:
    """Render one clip of ``process`` in one of ``looks`` (drawn from the seed); the same arguments give
    identical output."""
    if process not in PROCESSES:
        raise KeyError(f"unknown process {process!r}; choose from {sorted(PROCESSES)}")
    check_looks(looks)
    rng = np.random.default_rng(seed)
    look = str(rng.choice(list(looks)))
    template = TEMPLATES[process][int(rng.integers(len(TEMPLATES[process])))]
    scene = PROCESSES[process](rng, size, frames)
    frames_u8 = _compose(scene, look, size, rng)
    params = {"look": look, **scene.params}
    words = {
        "look": look,
        "speed": params.get("speed", ""),
        "direction": DIRECTION_WORDS.get(params.get("direction", ""), ""),
    }
    words["side"] = SIDE_WORDS.get(params.get("source_side", ""), "")
    prompt = template.format(**words)
    return Clip(process, int(seed), frames_u8, prompt, params, scene.truth)


#: Words that identify each process in a free-form prompt, checked in this order.
PROCESS_KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("mitosis", ("divid", "mitosis", "daughter")),
    ("apoptosis", ("apopto", "shrink", "bleb", "dying")),
    ("blood_flow", ("blood",)),
    ("chemotaxis", ("bacteri", "chemotaxis")),
    ("vesicle_transport", ("vesicle",)),
    ("diffusion", ("diffus", "brownian", "particle", "molecule")),
)
_SIDE_BY_WORD = {"right": "right", "left": "left", "top": "up", "bottom": "down"}
_PROMPT_PARAMS = {
    "diffusion": ("speed",),
    "blood_flow": ("speed", "direction"),
    "vesicle_transport": ("speed", "direction"),
    "chemotaxis": ("source_side",),
}


def parse_prompt(prompt: str) -> tuple[str, dict]:
    """The process a free-form prompt describes and the parameter values it pins down.

    E.g. ``"red blood cells flowing to the right"`` -> ``("blood_flow", {"direction": "right"})``.
    Raises ``ValueError`` when no process keyword occurs.
    """
    text = prompt.lower()
    words = set(text.replace(",", " ").replace(":", " ").split())
    process = next((name for name, keys in PROCESS_KEYWORDS if any(k in text for k in keys)), None)
    if process is None:
        raise ValueError(f"no simulator process recognised in {prompt!r}")
    found = {
        "look": [look for look in LOOKS if look in words],
        "speed": [w for w in ("slow", "fast") if w in words],
        "direction": [d for d in DIRECTIONS if d in words],
        "source_side": [side for w, side in _SIDE_BY_WORD.items() if w in words],
    }
    where = {k: found[k][0] for k in ("look", *_PROMPT_PARAMS.get(process, ())) if len(found[k]) == 1}
    return process, where


def simulate_prompt(prompt: str, seed: int, size: int = 64, frames: int = 17, max_tries: int = 1000) -> Clip:
    """A simulator clip matching a free-form prompt (the reference "generator" for any caption).

    Candidate seeds are drawn deterministically from ``seed`` until a clip of the prompt's process
    has the parameters the prompt pins down (look, direction, speed word, source side).
    """
    process, where = parse_prompt(prompt)
    for candidate in clip_seeds(seed, max_tries):
        clip = render_clip(process, candidate, size, frames)
        if all(clip.params.get(k) == v for k, v in where.items()):
            return clip
    raise ValueError(f"no {process} clip with {where} in {max_tries} tries")


def clip_seeds(seed: int, n: int) -> list[int]:
    """The per-clip seeds of a dataset with base ``seed`` (clip ``i`` always gets the same one)."""
    return [int(x) for x in np.random.SeedSequence(seed).generate_state(n, dtype=np.uint32)]


def parse_processes(value: str | None) -> list[str] | None:
    """Comma-separated process names -> list (``None`` for all); raises ``ValueError`` on unknown names."""
    if not value:
        return None
    names = [p.strip() for p in value.split(",") if p.strip()]
    unknown = sorted(set(names) - set(PROCESSES))
    if unknown:
        raise ValueError(f"unknown processes {unknown}; choose from {sorted(PROCESSES)}")
    return names
