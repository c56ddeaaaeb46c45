"""Few-step, CFG-free students of a Wan checkpoint: rectified-flow distillation as in InstaFlow.

The method is reflow with a guided teacher (Liu, Gong, Liu, "Flow Straight and Fast: Learning to Generate
and Transfer Data with Rectified Flow", ICLR 2023; Liu et al., "InstaFlow: One Step is Enough for
High-Quality Diffusion-Based Text-to-Image Generation", ICLR 2024):

1. ``pairs/``   the teacher, sampled as it is served (its own scheduler, ``teacher_steps`` steps, CFG
                ``teacher_guidance``), maps seeded noise ``z`` to a latent ``x0`` for each training prompt;
                each chunk of pairs is saved with the prompt embeddings, so an interrupted run resumes;
2. ``train/``   a LoRA on the teacher's DiT learns the straight path of each pair: ``x_t = (1 - t) x0 + t z``
                with the constant target ``z - x0``, from the conditional forward alone (the guidance is in
                the pairs). Timesteps come mostly from the student's Euler grids, so a few Euler steps follow
                the straightened paths, and otherwise from the teacher's training distribution;
3. ``student/`` the LoRA (``pytorch_lora_weights.safetensors``, diffusers layout) declaring its sampling in
                its metadata (``microverse_defaults``: steps, guidance 1 with ``cfg_distilled``, the Euler
                sampler and its shift), so the service runs it as a named adapter with the ``distilled`` preset.

:func:`benchmark` measures, in one run on the physics evaluation's held-out cases, seconds per clip and
physics accuracy of the teacher, its ``fast`` preset and the student at each step count. ``DISTILL_CONFIGS``
holds the demo recipe and a seconds-long debug one.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from evaluation.physics import ModelRunner, evaluate_physics, heldout_cases
from training.config import DIFFUSERS_LORA_TARGETS, ModelConfig, ObjectiveConfig, OptimConfig
from training.demo import DEFAULTS_FILE, demo_config, make_data
from training.objective import FlowMatchObjective

logger = logging.getLogger(__name__)

DEMO_MODEL = Path(__file__).resolve().parents[1] / "microverse" / "assets" / "microverse-demo"
"""The embedded demo model (the default teacher)."""
LORA_FILE = "pytorch_lora_weights.safetensors"
"""The student's file name (the one ``WanPipeline.load_lora_weights`` and the service look for)."""
DEFAULTS_METADATA_KEY = "microverse_defaults"
"""Safetensors metadata entry with the sampling a LoRA declares (read by ``microverse.loading.read_lora``)."""
METRICS_FILE = "distill_metrics.json"
"""Training and benchmark figures, next to the student."""


@dataclass
class DistillConfig:
    """A distillation run."""

    name: str = "microverse-demo-student"
    """Student name (the adapter name the card suggests)."""
    teacher: str | None = None
    """Diffusers Wan pipeline folder of the teacher (its ``microverse_defaults.json`` gives the clip shape);
    None: the embedded demo model."""
    prompts: str | None = None
    """Dataset folder whose ``metadata.json`` captions are the training prompts; None: the demo recipe's
    simulator captions (the teacher's own training set, rebuilt in ``data/``)."""
    pairs: int = 640
    """Teacher samples (noise, latent) to distil from."""
    pair_batch: int = 16
    """Teacher samples per pipeline call (one chunk file each)."""
    teacher_steps: int = 20
    """Teacher sampling steps (with its own scheduler)."""
    teacher_guidance: float = 5.0
    """Teacher CFG scale."""
    student_steps: tuple[int, ...] = (4, 2)
    """Euler step counts the student is trained for (and benchmarked at)."""
    declared_steps: int = 2
    """Steps the student declares as its default (one of ``student_steps``). The demo student at 2 steps matched
    the teacher's physics accuracy at 0.18x to 0.21x its time per clip in three benchmark runs; at 4 steps it
    scored 3 points higher at 0.23x to 0.28x, around the quarter-time bar."""
    flow_shift: float = 1.0
    """Timestep shift of the student's Euler sampler (1: evenly spaced sigmas)."""
    grid_fraction: float = 0.75
    """Fraction of training timesteps drawn from the student's Euler grids (the rest: logit-normal, as the
    teacher was trained)."""
    logit_mean: float = 0.5
    """Mean of the logit-normal timesteps (the demo teacher's)."""
    teacher_shift: float = 3.0
    """Shift of those timesteps (the demo teacher's training shift)."""
    lora_rank: int = 64
    """LoRA rank."""
    lora_alpha: int = 64
    """LoRA alpha (scale alpha / rank)."""
    lora_targets: tuple[str, ...] = DIFFUSERS_LORA_TARGETS
    """Modules with adapters (attention projections and feed-forward layers of every block)."""
    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 8
    """Pairs per step."""
    lr: float = 5e-4
    """Peak learning rate."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    decay_steps: int = 300
    """Final steps of linear decay to 0."""
    checkpoint_every: int = 200
    """Steps between resumable checkpoints."""
    seed: int = 0
    """Seed of the teacher's noise, the timesteps and the batch order."""
    eval_per_process: int = 10
    """Held-out simulator prompts per process in the benchmark."""

    @property
    def teacher_dir(self) -> str:
        """The teacher's folder."""
        return self.teacher or str(DEMO_MODEL)


def demo_distill_config() -> DistillConfig:
    """The demo student: about 13 minutes of teacher samples and 14 of training on a 2-core CPU."""
    return DistillConfig()


def debug_distill_config() -> DistillConfig:
    """Seconds-long run of every stage, for tests (``teacher`` must be set to a small model)."""
    return DistillConfig(name="student-debug", pairs=4, pair_batch=2, teacher_steps=2, lora_rank=4, lora_alpha=4,
                         steps=4, batch_size=2, warmup_steps=1, decay_steps=2, checkpoint_every=2,
                         eval_per_process=1)  # fmt: skip


DISTILL_CONFIGS: dict[str, Callable[[], DistillConfig]] = {"demo": demo_distill_config,
                                                            "debug": debug_distill_config}


def teacher_defaults(teacher: str | Path) -> dict:
    """The teacher's ``microverse_defaults.json`` (clip shape, text length, negative prompt)."""
    path = Path(teacher) / DEFAULTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the teacher must be a model folder with its generation defaults")
    return json.loads(path.read_text())


def training_prompts(cfg: DistillConfig, out: Path) -> list[str]:
    """``cfg.pairs`` captions, cycling through the dataset's."""
    folder = make_data(demo_config(), out / "data") if cfg.prompts is None else Path(cfg.prompts)
    rows = json.loads((folder / "metadata.json").read_text())
    if not rows:
        raise ValueError(f"{folder}/metadata.json has no captions")
    return [rows[i % len(rows)]["prompt"] for i in range(cfg.pairs)]


def student_sigmas(steps: int, shift: float) -> torch.Tensor:
    """Sigmas the student's Euler sampler starts its ``steps`` steps from (diffusers' flow-matching Euler)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas[:-1].float()


# ----------------------------------------------------------------------------------------------
# stage 1: teacher pairs


def make_pairs(cfg: DistillConfig, out: Path) -> Path:
    """Teacher samples in chunk files ``pairs/chunk-NNNNN.safetensors`` (``noise``, ``latents``,
    ``prompt_embeds``); chunks already there are kept."""
    from diffusers import WanPipeline

    pairs_dir = out / "pairs"
    pairs_dir.mkdir(parents=True, exist_ok=True)
    n_chunks = -(-cfg.pairs // cfg.pair_batch)
    todo = [i for i in range(n_chunks) if not (pairs_dir / f"chunk-{i:05d}.safetensors").exists()]
    if not todo:  # resumed with every chunk made: the captions are not even read
        return pairs_dir
    prompts = training_prompts(cfg, out)
    chunks = [prompts[i : i + cfg.pair_batch] for i in range(0, len(prompts), cfg.pair_batch)]
    d = teacher_defaults(cfg.teacher_dir)
    pipe = WanPipeline.from_pretrained(cfg.teacher_dir)
    pipe.set_progress_bar_config(disable=True)
    frames = (d["num_frames"] - 1) // pipe.vae_scale_factor_temporal + 1
    shape = (pipe.transformer.config.in_channels, frames, d["height"] // pipe.vae_scale_factor_spatial,
             d["width"] // pipe.vae_scale_factor_spatial)  # fmt: skip
    length = d.get("max_sequence_length", 512)
    for i in tqdm(todo, desc="teacher pairs", unit="chunk"):
        batch = chunks[i]
        noise = torch.randn((len(batch), *shape), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + i))
        with torch.no_grad():
            embeds, negative = pipe.encode_prompt(batch, [d.get("negative_prompt", "")] * len(batch),
                                                  do_classifier_free_guidance=True, max_sequence_length=length)
            latents = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, latents=noise.clone(),
                           height=d["height"], width=d["width"], num_frames=d["num_frames"],
                           num_inference_steps=cfg.teacher_steps, guidance_scale=cfg.teacher_guidance,
                           output_type="latent").frames  # fmt: skip
        tmp = pairs_dir / f"chunk-{i:05d}.tmp"
        save_file({"noise": noise, "latents": latents.float().contiguous(), "prompt_embeds": embeds.contiguous()},
                  str(tmp), metadata={"prompts": json.dumps(batch)})  # fmt: skip
        tmp.replace(pairs_dir / f"chunk-{i:05d}.safetensors")
    return pairs_dir


def load_pairs(pairs_dir: Path) -> dict[str, torch.Tensor]:
    """Every chunk's tensors, concatenated."""
    files = sorted(pairs_dir.glob("chunk-*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no teacher pairs in {pairs_dir}")
    chunks = [load_file(str(f)) for f in files]
    return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}


# ----------------------------------------------------------------------------------------------
# stage 2: the student


class TimestepSampler:
    """Training sigmas: ``grid_fraction`` from the student's Euler grids, the rest logit-normal."""

    def __init__(self, cfg: DistillConfig):
        self.grid = torch.cat([student_sigmas(n, cfg.flow_shift) for n in cfg.student_steps])
        self.fraction = cfg.grid_fraction
        self.objective = FlowMatchObjective(ObjectiveConfig(flow_shift=cfg.teacher_shift,
                                                            timestep_sampling="logit_normal",
                                                            logit_mean=cfg.logit_mean, loss_weighting="none"))

    def __call__(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        on_grid = torch.rand(batch, generator=generator) < self.fraction
        grid = self.grid[torch.randint(0, len(self.grid), (batch,), generator=generator)]
        return torch.where(on_grid, grid, self.objective.sample_sigmas(batch, generator))


def reflow_loss(model, pairs: dict[str, torch.Tensor], sigmas: torch.Tensor) -> torch.Tensor:
    """MSE between the model's velocity at ``x_t = (1 - t) x0 + t z`` and the straight path's ``z - x0``."""
    x0, z = pairs["latents"], pairs["noise"]
    x_t = FlowMatchObjective.noisy_input(x0, z, sigmas)
    pred = model(hidden_states=x_t, timestep=sigmas * 1000, encoder_hidden_states=pairs["prompt_embeds"],
                 return_dict=False)[0]  # fmt: skip
    return ((pred.float() - (z - x0).float()) ** 2).mean()


def train_student(cfg: DistillConfig, pairs_dir: Path, out: Path) -> dict:
    """Train the LoRA on the teacher pairs (resuming from ``train/checkpoint.pt``); returns the loss summary."""
    from diffusers import WanTransformer3DModel
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from training.trainer import build_lr_scheduler, prepare_transformer

    out.mkdir(parents=True, exist_ok=True)
    data = load_pairs(pairs_dir)
    model = prepare_transformer(
        WanTransformer3DModel.from_pretrained(cfg.teacher_dir, subfolder="transformer"),
        ModelConfig(pretrained=cfg.teacher_dir, mode="lora", lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                    lora_targets=cfg.lora_targets),
    )  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    schedule = build_lr_scheduler(OptimConfig(lr=cfg.lr, schedule="warmup_stable_decay", warmup_steps=cfg.warmup_steps,
                                              decay_steps=cfg.decay_steps), optimizer, cfg.steps)  # fmt: skip
    sampler = TimestepSampler(cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    step = 0
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        set_peft_model_state_dict(model, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        step, losses = state["step"], state["losses"]
        logger.info("resumed the student at step %d", step)
    model.train()
    n = len(data["latents"])
    progress = tqdm(total=cfg.steps, initial=step, desc="student", unit="step")
    while step < cfg.steps:
        idx = torch.randint(0, n, (cfg.batch_size,), generator=generator)
        loss = reflow_loss(model, {k: v[idx] for k, v in data.items()}, sampler(cfg.batch_size, generator))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{statistics.fmean(losses[-50:]):.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            state = {"lora": get_peft_model_state_dict(model), "optimizer": optimizer.state_dict(),
                     "schedule": schedule.state_dict(), "generator": generator.get_state(), "step": step,
                     "losses": losses}  # fmt: skip
            torch.save(state, out / "checkpoint.tmp")
            (out / "checkpoint.tmp").replace(ckpt)
    progress.close()
    window = max(1, min(50, len(losses) // 4))
    return {"steps": step, "loss_first": statistics.fmean(losses[:window]),
            "loss_last": statistics.fmean(losses[-window:]), "pairs": n}  # fmt: skip


def declared_defaults(cfg: DistillConfig) -> dict:
    """The sampling the student declares (``microverse_defaults`` metadata of its LoRA)."""
    if cfg.declared_steps not in cfg.student_steps:
        raise ValueError(f"declared_steps={cfg.declared_steps} is not one of student_steps {cfg.student_steps}")
    return {"num_inference_steps": cfg.declared_steps, "guidance_scale": 1.0, "cfg_distilled": True,
            "scheduler": "euler", "flow_shift": cfg.flow_shift}  # fmt: skip


def export_student(cfg: DistillConfig, train_dir: Path, out: Path) -> Path:
    """The student folder: its LoRA in diffusers' layout with the declared sampling in the metadata."""
    from training.convert import save_diffusers_lora

    lora = torch.load(train_dir / "checkpoint.pt", weights_only=False)["lora"]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    file = save_diffusers_lora(lora, tmp, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    with safe_open(str(file), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    metadata[DEFAULTS_METADATA_KEY] = json.dumps(declared_defaults(cfg))
    save_file(tensors, str(file), metadata=metadata)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out / LORA_FILE


# ----------------------------------------------------------------------------------------------
# benchmark


@dataclass(frozen=True)
class BenchRow:
    """One sampling configuration of the benchmark."""

    label: str
    """Row name."""
    steps: int
    """Denoising steps requested."""
    guidance_scale: float
    """CFG scale (1: one forward per step)."""
    preset: str = "exact"
    """Engine preset."""
    student: bool = False
    """Whether the student adapter is applied."""


def bench_rows(cfg: DistillConfig, teacher_steps: int, teacher_guidance: float) -> list[BenchRow]:
    """The teacher, its ``fast`` preset, and the student at each of its step counts."""
    rows = [BenchRow("teacher", teacher_steps, teacher_guidance),
            BenchRow("fast preset", teacher_steps, teacher_guidance, preset="fast")]  # fmt: skip
    return rows + [BenchRow(f"student, {n} steps", n, 1.0, student=True) for n in cfg.student_steps]


def benchmark(cfg: DistillConfig, student: str | Path, runner: ModelRunner, looks: tuple[str, ...] = ("fluorescence",),
              ) -> dict:  # fmt: skip
    """Seconds per clip and physics accuracy of every :func:`bench_rows` row on the held-out cases, in one run.

    The rows take turns clip by clip (case 1 of every row, then case 2, ...), so a machine that slows down or
    speeds up during the run moves every row alike; a clip's time is the median over the cases, after one
    warm-up clip per row."""
    d = teacher_defaults(cfg.teacher_dir)
    size, frames = d["height"], d["num_frames"]
    cases = heldout_cases(cfg.eval_per_process, size=size, frames=frames, looks=looks)
    rows = bench_rows(cfg, cfg.teacher_steps, cfg.teacher_guidance)
    gens = []
    for row in rows:
        gen = runner.generate(cfg.teacher_dir, size, frames, row.steps, row.guidance_scale, preset=row.preset,
                              lora=str(student) if row.student else None)  # fmt: skip
        gen("a cell divides into two daughter cells", 0)
        gens.append(gen)
    videos: list[dict] = [{} for _ in rows]
    seconds: list[list[float]] = [[] for _ in rows]
    for c in tqdm(cases, desc="benchmark", unit="case"):
        for k, gen in enumerate(gens):
            t0 = time.perf_counter()
            videos[k][(c.prompt, c.seed)] = gen(c.prompt, c.seed)
            seconds[k].append(time.perf_counter() - t0)
    results = []
    for row, clips, times in zip(rows, videos, seconds, strict=True):
        report = evaluate_physics(lambda prompt, seed, clips=clips: clips[(prompt, seed)], cases, row.label)
        results.append({**asdict(row), "seconds_per_clip": statistics.median(times), "accuracy": report.accuracy()})
        logger.info("%s: %.3f s per clip, physics %.0f %%", row.label, results[-1]["seconds_per_clip"],
                    100 * results[-1]["accuracy"]["overall"])  # fmt: skip
    teacher = results[0]
    for r in results:
        r["time_vs_teacher"] = r["seconds_per_clip"] / teacher["seconds_per_clip"]
        r["points_vs_teacher"] = 100 * (r["accuracy"]["overall"] - teacher["accuracy"]["overall"])
    declared = next(r for r in results if r["student"] and r["steps"] == cfg.declared_steps)
    return {"rows": results, "cases": len(cases), "threads": torch.get_num_threads(),
            "acceptance": {"student_steps": declared["steps"], "points_vs_teacher": declared["points_vs_teacher"],
                           "time_vs_teacher": declared["time_vs_teacher"],
                           "ok": declared["points_vs_teacher"] >= -10 and declared["time_vs_teacher"] <= 0.25}}


def bench_table(bench: dict) -> str:
    """Markdown table of a :func:`benchmark` result."""
    lines = ["| sampling | steps | CFG | s per clip | vs teacher | physics | vs teacher |", "|" + "---|" * 7]
    for r in bench["rows"]:
        lines.append(f"| {r['label']} | {r['steps']} | {r['guidance_scale']:g} | "
                     f"{r['seconds_per_clip']:.2f} | {r['time_vs_teacher']:.2f}x | "
                     f"{100 * r['accuracy']['overall']:.0f} % | {r['points_vs_teacher']:+.0f} |")  # fmt: skip
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# the whole run


def distill(cfg: DistillConfig, out: str | Path) -> Path:
    """Every stage (each resumes from what ``out`` holds); returns the student folder."""
    out = Path(out)
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}

    def stage(name: str, fn):
        t0 = time.perf_counter()
        result = fn()
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        timings_file.write_text(json.dumps(timings, indent=2))
        return result

    out.mkdir(parents=True, exist_ok=True)
    pairs = stage("pairs", lambda: make_pairs(cfg, out))
    training = stage("train", lambda: train_student(cfg, pairs, out / "train"))
    student = export_student(cfg, out / "train", out / "student").parent
    metrics = {"training": training, "timings": timings, "declared": declared_defaults(cfg), "config": asdict(cfg)}
    (student / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    logger.info("student written to %s (%.1f MB)", student, (student / LORA_FILE).stat().st_size / 1e6)
    return student


def student_config(student: str | Path) -> DistillConfig:
    """The :class:`DistillConfig` a student folder was trained with (its ``distill_metrics.json``)."""
    path = Path(student) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: STUDENT must be a folder written by `microverse train distill`")
    saved = json.loads(path.read_text())["config"]
    fields = DistillConfig.__dataclass_fields__
    known = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields}
    return DistillConfig(**known)


def write_card(cfg: DistillConfig, student: Path, runner: ModelRunner) -> str:
    """Benchmark ``student`` against its teacher, add the result to its metrics and write its model card;
    returns the benchmark table."""
    bench = benchmark(cfg, student, runner)
    metrics = json.loads((student / METRICS_FILE).read_text())
    metrics["benchmark"] = bench
    (student / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    (student / "README.md").write_text(model_card(cfg, metrics, (student / LORA_FILE).stat().st_size))
    return bench_table(bench)


def model_card(cfg: DistillConfig, metrics: dict, file_bytes: int) -> str:
    """The student's README: method, recipe, how to serve it, and the benchmark."""
    tr, bench = metrics["training"], metrics["benchmark"]
    acc = bench["acceptance"]
    t = metrics.get("timings", {})
    teacher = "the embedded demo model (`microverse/assets/microverse-demo`)" if cfg.teacher is None else cfg.teacher
    return f"""# {cfg.name}

A {cfg.declared_steps}-step, CFG-free student of {teacher}: a rank-{cfg.lora_rank} LoRA
({file_bytes / 1e6:.1f} MB) that runs {cfg.declared_steps} Euler steps with one forward each, where the teacher
runs {cfg.teacher_steps} steps with classifier-free guidance {cfg.teacher_guidance:g} (two forwards each).

## Method
Rectified-flow distillation with a guided teacher, as in InstaFlow (Liu et al., ICLR 2024; reflow from Liu, Gong
and Liu, "Flow Straight and Fast", ICLR 2023), built by `microverse train distill` (`training/distill.py`):

1. **Teacher pairs** ({t.get('pairs', 0) / 60:.1f} min): the teacher, sampled as served ({cfg.teacher_steps} steps of
   its UniPC scheduler, CFG {cfg.teacher_guidance:g}), maps seeded noise to a latent for {tr['pairs']} captions
   of its own training set.
2. **Student** ({t.get('train', 0) / 60:.1f} min): a LoRA on the teacher's DiT learns the straight path of each pair
   (input `(1 - t) x0 + t z`, target `z - x0`) from the conditional forward alone; {cfg.grid_fraction:.0%} of
   the timesteps come from its Euler grids ({', '.join(map(str, cfg.student_steps))} steps, shift
   {cfg.flow_shift:g}). {tr['steps']} steps of {cfg.batch_size} pairs, AdamW at {cfg.lr:g} (warmup
   {cfg.warmup_steps}, linear decay over the last {cfg.decay_steps}); loss {tr['loss_first']:.3f} ->
   {tr['loss_last']:.3f}.
3. **Export**: `pytorch_lora_weights.safetensors` in diffusers' layout; its metadata declares the sampling
   (`microverse_defaults`: {json.dumps(metrics['declared'])}).

## Serving it
```bash
MICROVERSE_LORAS=student=microverse/assets/{cfg.name} make serve
curl -s localhost:3000/generate -H 'content-type: application/json' -o clip.mp4 \\
  -d '{{"prompt": "a cell divides into two daughter cells", "lora": "student", "preset": "distilled"}}'
```
A request naming the adapter runs its declared steps, guidance 1 and Euler sampler; a request for guidance above 1
gets a 400 (the guidance is distilled into the weights).

## Benchmark
`microverse train distill-bench microverse/assets/{cfg.name}`: one run, {bench['cases']} held-out physics cases
(`evaluation.physics`), {bench['threads']} CPU threads, the rows taking turns clip by clip; seconds per clip
is the median over the cases (text encoding, denoising and VAE decoding through the serving engine), after one
warm-up clip per row.

{bench_table(bench)}

The student at its declared {acc['student_steps']} steps: {acc['points_vs_teacher']:+.0f} points of physics accuracy
against the teacher, in {acc['time_vs_teacher']:.2f}x its time per clip (bar: within 10 points at at most 0.25x):
**{'met' if acc['ok'] else 'not met'}**. {other_rows(bench, acc['student_steps'])}

Per process (physics accuracy):

{process_table(bench)}
"""


def other_rows(bench: dict, declared: int) -> str:
    """A sentence on the student rows other than the declared one."""
    rows = [r for r in bench["rows"] if r["student"] and r["steps"] != declared]
    return " ".join(f"At {r['steps']} steps: {r['points_vs_teacher']:+.0f} points in {r['time_vs_teacher']:.2f}x the "
                    "teacher's time." for r in rows)


def process_table(bench: dict) -> str:
    """Physics accuracy per process (rows) and benchmark row (columns)."""
    rows = bench["rows"]
    procs = [p for p in rows[0]["accuracy"] if p != "overall"]
    lines = ["| process | " + " | ".join(r["label"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    lines += [f"| {p} | " + " | ".join(f"{100 * r['accuracy'][p]:.0f} %" for r in rows) + " |" for p in procs]
    return "\n".join(lines)

