"""``microverse bench``: the engine's presets against plain diffusers ``WanPipeline`` in one process.

Both sides load the same diffusers-format checkpoint (real weights when ``--model`` is given,
else seeded random weights of the chosen size saved once into the cache), get the same prompt,
seed and settings, and run alternately; the JSON holds the medians, the ratio to plain diffusers
and the deviation from its output (relative L2 of the final latents, PSNR of the decoded frames).

FLOP model of one transformer forward over L video tokens and T text tokens, per block (d =
heads x head_dim, f = ffn width): self-attention projections 8·d²·L, attention 4·L²·d, cross-attention
query/output projections 4·d²·L, cross-attention 4·L·T·d, feed-forward 4·d·f·L. At Wan2.1-1.3B,
480x832x81 (L = 32,760, T = 512) that is 2.83e14 FLOPs, as in ``shared/reference/wan_baseline.py``.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import platform
import resource
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, NamedTuple

import click
import numpy as np
import torch

from ..config import Settings, default_cache_dir
from ..schemas import GenerationSpec, InputError, Limits, check_inputs

logger = logging.getLogger(__name__)

Size = Literal["tiny", "1.3b"]

#: Wan2.1-T2V-1.3B transformer configuration (diffusers ``WanTransformer3DModel``).
WAN_1_3B = {"patch_size": (1, 2, 2), "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
            "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30,
            "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024}
#: The benchmark's stand-in for UMT5-XXL: same width (4096), 2 of its 24 layers (text encoding is < 0.1 % of the time).
TEXT_ENCODER_1_3B = {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 2, "num_heads": 64,
                     "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32}


@dataclass
class BenchConfig:
    """One benchmark run."""

    size: Size = "tiny"
    """Random-weight model size when ``model`` is not given."""
    model: str | None = None
    """A diffusers-format Wan2.1 checkpoint folder (real weights) instead of random ones."""
    presets: tuple[str, ...] = ("exact", "fast")
    """Engine presets to time; ``fast@fast_step_ratio=0.3:fast_cfg_cutoff=0.5`` is a variant with other knobs."""
    prompt: str = "time lapse microscopy of a cell dividing into two daughter cells"
    """Prompt of every run."""
    negative_prompt: str = ""
    """Negative prompt of every run."""
    height: int | None = None
    """Pixels; None: the model's default (``microverse_defaults.json``), 480 (1.3b) or 64 (tiny)."""
    width: int | None = None
    """Pixels; None: the model's default, 832 (1.3b) or 64 (tiny)."""
    num_frames: int | None = None
    """Frames; None: the model's default, 81 (1.3b) or 9 (tiny)."""
    steps: int | None = None
    """Denoising steps; None: the model's default, 50 (1.3b) or 10 (tiny)."""
    guidance_scale: float = 5.0
    """CFG scale."""
    seed: int = 0
    """Noise seed."""
    repeats: int = 2
    """Timed runs per side (alternating); medians are reported."""
    warmup_steps: int = 2
    """Steps of the untimed warm-up run of each side (compile, kernel selection, allocator)."""
    device: str = "auto"
    """``auto``, ``cuda`` or ``cpu``."""
    compile: bool = False
    """Regional torch.compile in the engine (the baseline is never compiled)."""
    attention_backend: str = "auto"
    """Engine attention backend (``Settings.attention_backend``)."""
    draft_batch: int = 0
    """Draft mode: also time batches of this size against batch 1 at the draft shape; 0 skips it."""
    cache_dir: Path = field(default_factory=lambda: default_cache_dir() / "bench")
    """Where random-weight checkpoints are saved."""
    overrides: dict = field(default_factory=dict)
    """Extra ``Settings`` fields for the engine (e.g. ``fast_step_ratio``)."""

    def shape(self) -> tuple[int, int, int, int]:
        """(height, width, num_frames, steps) with the defaults filled in: ``model``'s own (its
        ``microverse_defaults.json``, else Wan2.1's), else the random size's."""
        if self.model is not None:
            from ..loading import read_defaults

            model = read_defaults(self.model)
            default = (model.height, model.width, model.num_frames, model.num_inference_steps)
        else:
            default = (480, 832, 81, 50) if self.size == "1.3b" else (64, 64, 9, 10)
        given = (self.height, self.width, self.num_frames, self.steps)
        height, width, frames, steps = (g if g is not None else d for g, d in zip(given, default, strict=True))
        return height, width, frames, steps

    def draft_shape(self) -> tuple[int, int, int, int]:
        """(height, width, num_frames, steps) of draft mode: 256x256x33 at 20 steps (tiny: 64x64x9 at 4)."""
        big = self.size == "1.3b" or self.model is not None
        return (256, 256, 33, 20) if big else (64, 64, 9, 4)


#: The bench flag of each generation parameter the engine's input checks name.
FLAGS = {"height": "--height", "width": "--width", "num_frames": "--num-frames", "num_inference_steps": "--steps",
         "guidance_scale": "--guidance-scale", "seed": "--seed"}


def check_shape(cfg: BenchConfig, limits: Limits) -> None:
    """Raise :class:`InputError` when the service would refuse ``cfg``'s generation under ``limits``."""
    height, width, frames, steps = cfg.shape()
    check_inputs(prompt=cfg.prompt, negative_prompt=cfg.negative_prompt, height=height, width=width,
                 num_frames=frames, num_inference_steps=steps, guidance_scale=cfg.guidance_scale, fps=16,
                 seed=cfg.seed, limits=limits)


def parse_variant(label: str) -> tuple[str, dict[str, float]]:
    """``fast@fast_step_ratio=0.3:fast_cfg_cutoff=0.5`` -> ("fast", {"fast_step_ratio": 0.3, ...})."""
    preset, _, knobs = label.partition("@")
    return preset, {k: float(v) for k, v in (kv.split("=", 1) for kv in knobs.split(":") if kv)}


def save_random_checkpoint(path: Path, size: Size, device: str = "cpu") -> Path:
    """Seeded random weights of ``size`` (initialised on ``device``) saved in diffusers format; reused when there."""
    from .tiny import save_tiny_pipeline

    path = Path(path)
    if (path / "model_index.json").exists():
        return path
    if size == "tiny":
        return save_tiny_pipeline(path)
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    from training.architecture import build_tokenizer

    from ..loading import DEFAULTS_FILE, ModelDefaults

    tmp = path.with_name(path.name + ".partial")
    logger.info("building Wan2.1-1.3B-size random weights into %s", path)
    tokenizer = build_tokenizer(512)
    with torch.device(device):
        torch.manual_seed(0)
        transformer = WanTransformer3DModel(**WAN_1_3B).to(torch.bfloat16)
        torch.manual_seed(1)
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1,
                                                   **TEXT_ENCODER_1_3B)).to(torch.bfloat16)
        torch.manual_seed(2)
        vae = AutoencoderKLWan()  # Wan2.1 VAE sizes and latent statistics are the class defaults
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=scheduler)
    pipe.save_pretrained(tmp)
    (tmp / DEFAULTS_FILE).write_text(json.dumps(asdict(ModelDefaults()), indent=2))
    tmp.rename(path)
    return path


def transformer_flops(config, tokens: int, text_tokens: int) -> float:
    """FLOPs of one transformer forward (batch 1) under the model in this module's docstring."""
    d = config.num_attention_heads * config.attention_head_dim
    per_block = (8 * d * d * tokens + 4 * tokens * tokens * d + 4 * d * d * tokens + 4 * tokens * text_tokens * d
                 + 4 * d * config.ffn_dim * tokens)
    return float(config.num_layers * per_block)


def video_tokens(pipe, height: int, width: int, num_frames: int) -> int:
    """Transformer sequence length of one video."""
    _, ph, pw = pipe.transformer.config.patch_size
    frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
    return frames * (height // pipe.vae_scale_factor_spatial // ph) * (width // pipe.vae_scale_factor_spatial // pw)


def decode_uint8(vae, latents: torch.Tensor) -> np.ndarray:
    """Decode latents with ``vae`` in its own dtype to uint8 frames (B, T, H, W, 3), as the engine does."""
    latents = latents.to(vae.device, vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
    video = vae.decode(latents * std + mean, return_dict=False)[0]
    video = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return video.permute(0, 2, 3, 4, 1).cpu().numpy()


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖ / ‖ref‖ in float64."""
    x, ref = x.double().cpu(), ref.double().cpu()
    return float((x - ref).norm() / ref.norm())


def psnr(x: np.ndarray, ref: np.ndarray) -> float:
    """PSNR in dB of uint8 frames against a reference (inf when identical)."""
    mse = float(np.mean((x.astype(np.float64) - ref.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


class Counter:
    """Counts transformer calls and full forwards (calls whose last block ran, i.e. not step-cached)."""

    def __init__(self, transformer):
        self.calls = 0
        self.full = 0
        self._handles = [
            transformer.register_forward_pre_hook(lambda *_: self._add("calls")),
            transformer.blocks[-1].ffn.register_forward_pre_hook(lambda *_: self._add("full")),
        ]

    def _add(self, name: str) -> None:
        setattr(self, name, getattr(self, name) + 1)

    def reset(self) -> None:
        self.calls = self.full = 0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class Clock:
    """Wall time and peak memory of one run on ``device``."""

    def __init__(self, device: str):
        self.device = device

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def start(self) -> float:
        self.sync()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        return time.perf_counter()

    def stop(self, t0: float) -> tuple[float, float | None]:
        """(seconds, peak GiB allocated above what was allocated at start; None on CPU)."""
        self.sync()
        seconds = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() - self._base) / 2**30 if self.device == "cuda" else None
        return seconds, peak


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _weights_gib(*modules) -> float:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters()) / 2**30


class PlainRun(NamedTuple):
    """One timed run of plain diffusers."""

    latents: torch.Tensor
    video: np.ndarray
    seconds: float
    denoise_seconds: float
    peak_gib: float | None


class EngineRun(NamedTuple):
    """One timed run of an engine preset, with its transformer call counts."""

    result: object
    seconds: float
    peak_gib: float | None
    calls: int
    full: int


class Sides:
    """Plain diffusers and the engine, loaded from the same checkpoint, and what every run of ``cfg`` shares."""

    def __init__(self, cfg: BenchConfig):
        from ..optimize import resolve_device, resolve_dtype

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype("auto", self.device)
        from ..runtime import limits_of

        self.source = cfg.model or str(
            save_random_checkpoint(Path(cfg.cache_dir) / f"wan-{cfg.size}-random", cfg.size, self.device))
        self.height, self.width, self.frames, self.steps = cfg.shape()
        self.clock = Clock(self.device)
        self.engine = _load_engine(cfg, self.source, self.device)
        check_shape(cfg, limits_of(Settings(**cfg.overrides), self.engine))  # the model's positional range
        self.plain = _load_plain(self.source, self.device, self.dtype)
        self.server_options = self.engine.options
        self.max_len = self.engine.model.defaults.max_sequence_length
        self.tokens = video_tokens(self.plain, self.height, self.width, self.frames)
        self.flops_fwd = transformer_flops(self.plain.transformer.config, self.tokens, self.max_len)
        self.plain_forwards = self.steps * (2 if cfg.guidance_scale > 1 else 1)
        self.plain_flops = self.plain_forwards * self.flops_fwd

    def run_plain(self, n_steps: int) -> PlainRun:
        """Plain diffusers to latents, then its VAE decode, timed as one."""
        cfg = self.cfg
        t0 = self.clock.start()
        latents = self.plain(prompt=cfg.prompt, negative_prompt=cfg.negative_prompt, height=self.height,
                             width=self.width, num_frames=self.frames, num_inference_steps=n_steps,
                             guidance_scale=cfg.guidance_scale, generator=torch.Generator("cpu").manual_seed(cfg.seed),
                             max_sequence_length=self.max_len, output_type="latent").frames
        self.clock.sync()
        t1 = time.perf_counter()
        video = decode_uint8(self.plain.vae, latents)
        seconds, peak = self.clock.stop(t0)
        return PlainRun(latents, video, seconds, t1 - t0, peak)

    def spec(self, preset: str, n_steps: int, seed: int, shape: tuple[int, int, int]) -> GenerationSpec:
        """The engine request of one video of ``shape`` (height, width, frames)."""
        cfg = self.cfg
        return GenerationSpec(prompt=cfg.prompt, negative_prompt=cfg.negative_prompt, height=shape[0], width=shape[1],
                              num_frames=shape[2], num_inference_steps=n_steps, guidance_scale=cfg.guidance_scale,
                              seed=seed, fps=16, preset=preset)

    def run_engine(self, label: str, n_steps: int) -> tuple[object, float, float | None]:
        """(result, seconds, peak GiB) of the engine on preset variant ``label``; the server options are restored."""
        preset, knobs = parse_variant(label)
        self.engine.options = replace(self.server_options, **knobs)
        try:
            t0 = self.clock.start()
            result = self.engine.generate([self.spec(preset, n_steps, self.cfg.seed,
                                                     (self.height, self.width, self.frames))])
            seconds, peak = self.clock.stop(t0)
        finally:
            self.engine.options = self.server_options
        return result, seconds, peak


def _load_plain(source: str, device: str, dtype: torch.dtype):
    """Plain diffusers: WanPipeline defaults, the VAE in float32 as diffusers' Wan example loads it."""
    from diffusers import WanPipeline

    plain = WanPipeline.from_pretrained(source, dtype={"vae": torch.float32, "default": dtype}).to(device)
    plain.set_progress_bar_config(disable=True)
    return plain


def _load_engine(cfg: BenchConfig, source: str, device: str):
    """The engine with ``cfg``'s settings on the same checkpoint."""
    from ..engine import DiffusersEngine

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(model=source, device=device, compile=cfg.compile, attention_backend=cfg.attention_backend,
                            storage_dir=Path(tmp), **cfg.overrides)
        return DiffusersEngine.from_settings(settings)


def _timed_runs(sides: Sides, counter: Counter) -> tuple[list[PlainRun], dict[str, list[EngineRun]]]:
    """A warm-up of each side, then ``repeats`` alternating timed runs of plain diffusers and every preset."""
    cfg = sides.cfg
    logger.info("warm-up (%d steps per side)", cfg.warmup_steps)
    sides.run_plain(cfg.warmup_steps)
    for preset in cfg.presets:
        sides.run_engine(preset, cfg.warmup_steps)
    base_runs, runs = [], {p: [] for p in cfg.presets}
    for r in range(cfg.repeats):
        base_runs.append(sides.run_plain(sides.steps))
        logger.info("plain diffusers run %d: %.2f s", r, base_runs[-1].seconds)
        for preset in cfg.presets:
            counter.reset()
            result, seconds, peak = sides.run_engine(preset, sides.steps)
            runs[preset].append(EngineRun(result, seconds, peak, counter.calls, counter.full))
            logger.info("%s run %d: %.2f s", preset, r, seconds)
    return base_runs, runs


def _setup(sides: Sides) -> dict:
    """Where and on what the benchmark ran: device, versions, model, dtype, shape, engine choices."""
    import diffusers

    cfg = sides.cfg
    return {
        "device": _device_name(sides.device),
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "size": "checkpoint" if cfg.model else cfg.size, "model": sides.source,
        "text_encoder": "checkpoint's" if cfg.model or cfg.size == "tiny" else
        f"random UMT5 d_model 4096, {TEXT_ENCODER_1_3B['num_layers']} layers (UMT5-XXL has 24)",
        "dtype": str(sides.dtype).removeprefix("torch."),
        "shape": {"height": sides.height, "width": sides.width, "num_frames": sides.frames, "steps": sides.steps,
                  "guidance_scale": cfg.guidance_scale, "seed": cfg.seed, "text_tokens": sides.max_len,
                  "video_tokens": sides.tokens},
        "repeats": cfg.repeats, "compile": cfg.compile, "attention_backend": sides.engine.choice.attention_backend,
        "vae_dtype": sides.engine.choice.vae_dtype,
        "flops_per_forward": sides.flops_fwd,
    }


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _baseline(sides: Sides, base_runs: list[PlainRun]) -> dict:
    """Medians of the plain diffusers runs."""
    base_s = _median([b.seconds for b in base_runs])
    return {
        "seconds": base_s, "seconds_all": [b.seconds for b in base_runs],
        "denoise_s_per_step": _median([b.denoise_seconds for b in base_runs]) / sides.steps,
        "peak_gib": _max_or_none([b.peak_gib for b in base_runs]),
        "weights_gib": _weights_gib(sides.plain.transformer, sides.plain.text_encoder, sides.plain.vae),
        "transformer_forwards": sides.plain_forwards,
        "tflops": sides.plain_flops / base_s / 1e12,
    }


def _preset_result(sides: Sides, items: list[EngineRun], reference: PlainRun, base_s: float) -> dict:
    """Medians of one preset's runs, its work done, and its last output's deviation from ``reference``."""
    result, _, _, calls, full = items[-1]
    seconds = _median([i.seconds for i in items])
    engine = sides.engine
    layers = engine.model.pipe.transformer.config.num_layers
    done_flops = (full + (calls - full) / layers) * sides.flops_fwd
    engine_video = np.stack(result.videos)
    return {
        "seconds": seconds, "seconds_all": [i.seconds for i in items],
        "ratio_to_plain": seconds / base_s, "speedup": base_s / seconds,
        "denoise_s_per_step": _median([i.result.denoise_seconds for i in items]) / result.plan.num_inference_steps,
        "decode_s": _median([i.result.decode_seconds for i in items]),
        "peak_gib": _max_or_none([i.peak_gib for i in items]),
        "steps_run": result.plan.num_inference_steps, "cfg_steps": result.plan.cfg_steps,
        "step_cache_threshold": result.plan.cache_threshold,
        "transformer_calls": calls, "full_forwards": full,
        "tflops_achieved": done_flops / seconds / 1e12,
        "tflops_effective": sides.plain_flops / seconds / 1e12,
        "latent_rel_l2": rel_l2(result.latents, reference.latents),
        "psnr_db": psnr(engine_video, reference.video),
        "vae_decode_psnr_db": psnr(engine_video, decode_uint8(sides.plain.vae, result.latents)),
        "prompt_cache": {"hits": engine.prompt_cache.hits, "misses": engine.prompt_cache.misses},
    }


def run_bench(cfg: BenchConfig) -> dict:
    """Run the benchmark of ``cfg`` and return its results (the JSON ``microverse bench`` writes)."""
    sides = Sides(cfg)
    counter = Counter(sides.engine.model.pipe.transformer)
    with torch.inference_mode():
        base_runs, runs = _timed_runs(sides, counter)
        out = {**_setup(sides), "baseline": _baseline(sides, base_runs)}
        base_s = out["baseline"]["seconds"]
        out["presets"] = {preset: _preset_result(sides, items, base_runs[-1], base_s) for preset, items in runs.items()}
        if cfg.draft_batch > 1:
            out["draft"] = _draft(sides)
        if sides.device == "cpu":
            out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    counter.remove()
    return out


def _max_or_none(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return max(xs) if xs else None


def _draft(sides: Sides) -> dict:
    """Videos per second of the exact preset at the draft shape: batch 1 against batch ``cfg.draft_batch``."""
    cfg, engine, clock, spec = sides.cfg, sides.engine, sides.clock, sides.spec
    h, w, f, steps = cfg.draft_shape()
    out = {"shape": {"height": h, "width": w, "num_frames": f, "steps": steps}, "batch": cfg.draft_batch}
    for batch in (1, cfg.draft_batch):
        specs = [spec("exact", steps, seed=cfg.seed + i, shape=(h, w, f)) for i in range(batch)]
        engine.generate(specs)  # warm-up at this batch size
        times = []
        for _ in range(cfg.repeats):
            t0 = clock.start()
            engine.generate(specs)
            times.append(clock.stop(t0)[0])
        out[f"b{batch}_seconds"] = _median(times)
        out[f"b{batch}_videos_per_s"] = batch / _median(times)
    out["throughput_ratio"] = out[f"b{cfg.draft_batch}_videos_per_s"] / out["b1_videos_per_s"]
    return out


def summary(result: dict) -> str:
    """A short text table of ``result``."""
    b = result["baseline"]
    lines = [f"{result['device']} | {result['size']} | {result['shape']}",
             (f"{'side':<10}{'s/video':>10}{'s/step':>9}{'ratio':>7}{'TFLOP/s':>9}{'peak GiB':>9}{'rel L2':>9}"
              f"{'PSNR':>7}"),
             (f"{'plain':<10}{b['seconds']:>10.3f}{b['denoise_s_per_step']:>9.4f}{1.0:>7.3f}{b['tflops']:>9.2f}"
              f"{_fmt(b['peak_gib']):>9}{'-':>9}{'-':>7}")]
    for name, p in result["presets"].items():
        lines.append(f"{name:<10}{p['seconds']:>10.3f}{p['denoise_s_per_step']:>9.4f}{p['ratio_to_plain']:>7.3f}"
                     f"{p['tflops_achieved']:>9.2f}{_fmt(p['peak_gib']):>9}{p['latent_rel_l2']:>9.2e}"
                     f"{p['psnr_db']:>7.1f}")
    if "draft" in result:
        d = result["draft"]
        lines.append(f"draft {d['shape']}: batch {d['batch']} gives {d['throughput_ratio']:.2f}x the videos/s "
                     "of batch 1")
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


@click.command("bench")
@click.option("--size", type=click.Choice(["tiny", "1.3b"]), default="tiny", show_default=True,
              help="Random-weight model size (ignored with --model).")
@click.option("--model", default=None, help="A diffusers-format Wan2.1 checkpoint folder (real weights).")
@click.option("--presets", default="exact,fast", show_default=True, help="Comma-separated engine presets.")
@click.option("--height", type=int, default=None)
@click.option("--width", type=int, default=None)
@click.option("--num-frames", type=int, default=None)
@click.option("--steps", type=int, default=None)
@click.option("--guidance-scale", type=float, default=5.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--repeats", type=int, default=2, show_default=True, help="Timed runs per side; medians reported.")
@click.option("--warmup-steps", type=int, default=2, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--compile/--no-compile", default=False, show_default=True, help="Regional torch.compile in the engine.")
@click.option("--attention-backend", default="auto", show_default=True)
@click.option("--draft-batch", type=int, default=0, show_default=True,
              help="Also time this batch size against batch 1 at the draft shape (256x256x33, 20 steps).")
@click.option("--set", "overrides", multiple=True, help="Engine setting NAME=VALUE, e.g. fast_step_ratio=0.3.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where random checkpoints are saved [default: cache dir/bench].")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("bench.json"),
              show_default=True, help="JSON output.")
def bench_command(presets: str, overrides: tuple[str, ...], cache_dir: Path | None, out: Path, **kwargs) -> None:
    """Time the engine's presets against plain diffusers WanPipeline on the same checkpoint.

    Without size flags a ``--model`` runs at its own defaults (``microverse_defaults.json``); a shape the
    service would refuse for the model is refused here too, naming the flag."""
    from ..checkpoint_options import check_checkpoint_options
    from ..runtime import limits_of

    check_checkpoint_options(kwargs["model"])
    cfg = BenchConfig(presets=_parse_presets(presets), overrides=_parse_settings(overrides), **kwargs)
    if cache_dir is not None:
        cfg.cache_dir = cache_dir
    try:
        check_shape(cfg, limits_of(Settings(**cfg.overrides)))
        result = run_bench(cfg)
    except InputError as exc:
        raise click.BadParameter(exc.message, param_hint=FLAGS.get(exc.param, exc.param)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    click.echo(summary(result))
    click.echo(f"wrote {out}")


def _parse_presets(text: str) -> tuple[str, ...]:
    """``--presets``: known presets, variant knobs that are ``fast_*`` settings with numeric values."""
    from ..presets import PRESETS, PresetOptions

    labels = tuple(p.strip() for p in text.split(",") if p.strip())
    if not labels:
        raise click.BadParameter("give at least one preset, e.g. exact,fast", param_hint="--presets")
    knobs_known = [name for name in PresetOptions.__dataclass_fields__ if name.startswith("fast_")]
    for label in labels:
        try:
            preset, knobs = parse_variant(label)
        except ValueError:
            raise click.BadParameter(f"{label!r}: variant knobs are NAME=NUMBER joined by ':', e.g. "
                                     "fast@fast_step_ratio=0.3:fast_cfg_cutoff=0.5", param_hint="--presets") from None
        if preset not in PRESETS:
            raise click.BadParameter(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}",
                                     param_hint="--presets")
        if unknown := sorted(set(knobs) - set(knobs_known)):
            raise click.BadParameter(f"unknown knob {unknown[0]!r} in {label!r}; knobs: {', '.join(knobs_known)}",
                                     param_hint="--presets")
    return labels


#: Settings the bench sets from its own flags (``--set`` may not give them too).
_OWN_SETTINGS = {"model": "--model", "device": "--device", "compile": "--compile",
                 "attention_backend": "--attention-backend", "storage_dir": None}


def _parse_settings(items: tuple[str, ...]) -> dict[str, str]:
    """``--set NAME=VALUE`` engine settings, checked against :class:`Settings`."""
    from pydantic import ValidationError

    values = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise click.BadParameter(f"expected NAME=VALUE, e.g. fast_step_ratio=0.3; got {item!r}", param_hint="--set")
        if name in _OWN_SETTINGS:
            flag = _OWN_SETTINGS[name]
            raise click.BadParameter(f"{name} is set by the bench" + (f": use {flag}" if flag else ""),
                                     param_hint="--set")
        if name not in Settings.model_fields:
            close = difflib.get_close_matches(name, Settings.model_fields, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise click.BadParameter(f"unknown engine setting {name!r}{hint}", param_hint="--set")
        values[name] = value
    try:
        Settings(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise click.BadParameter(f"{error['loc'][0]}: {error['msg']}, got {error['input']!r}",
                                 param_hint="--set") from None
    return values


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bench_command()
