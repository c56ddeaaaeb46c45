"""Wan2.1 fine-tuning (LoRA via peft, or full) with accelerate: one CPU, one GPU, N GPUs, N nodes.

Run with ``microverse train --config CONFIG`` (wrap in ``accelerate launch`` for several processes;
FSDP and DeepSpeed come from the accelerate config file). Output layout::

    <output_dir>/checkpoints/step-0000100/   accelerate state (trainable weights, optimizer, RNG,
                                             LR schedule, EMA) + trainer_state_<rank>.pt (data
                                             position, noise generator) + export/ (service format)
    <output_dir>/final/                      export of the last step
    <output_dir>/loss.csv, loss.png, logs/   loss history, curve, TensorBoard
    <output_dir>/validation/step-N/*.mp4     validation videos
"""

from __future__ import annotations

import csv
import gc
import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from media.video import write_mp4
from training.config import ModelConfig, OptimConfig, TrainConfig, config_to_dict, save_config
from training.convert import diffusers_to_original_keys, lora_diffusers_to_upstream, save_diffusers_lora
from training.dataset import BucketBatchSampler, CachedDataset, build_cache, build_samples, encoder_key
from training.objective import FlowMatchObjective

logger = logging.getLogger(__name__)

TRAINABLE_FILE = "trainable.safetensors"
CHECKPOINT_INFO = "microverse_checkpoint.json"


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """Newest complete ``checkpoints/step-N`` folder (partial saves end in ``.tmp``)."""
    ckpts = sorted((Path(output_dir) / "checkpoints").glob("step-[0-9]*[0-9]"))
    return ckpts[-1] if ckpts else None


def build_lr_scheduler(optim: OptimConfig, optimizer: torch.optim.Optimizer, max_steps: int):
    """The learning-rate schedule: a diffusers one by name, or ``warmup_stable_decay`` (transformers' WSD schedule
    with a linear decay; see :class:`OptimConfig`)."""
    if optim.schedule != "warmup_stable_decay":
        from diffusers.optimization import get_scheduler

        return get_scheduler(
            optim.schedule, optimizer, num_warmup_steps=optim.warmup_steps, num_training_steps=max_steps
        )
    from transformers import get_wsd_schedule

    warmup, decay = optim.warmup_steps, optim.decay_steps
    if not 0 < decay <= max_steps - warmup:
        raise ValueError(
            f"optim.decay_steps must be in 1..max_steps - warmup_steps ({max_steps - warmup}), got {decay}"
        )
    return get_wsd_schedule(
        optimizer, num_warmup_steps=warmup, num_decay_steps=decay, num_training_steps=max_steps, decay_type="linear"
    )


def prepare_transformer(transformer, cfg: ModelConfig):
    """Make ``transformer`` trainable per ``cfg``: peft LoRA adapters (fp32) on frozen weights, or every
    weight for a full fine-tune; plus gradient checkpointing."""
    if cfg.mode == "lora":
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        transformer.requires_grad_(False)
        transformer.add_adapter(
            LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=cfg.lora_alpha,
                target_modules=list(cfg.lora_targets),
                init_lora_weights=True,
            )
        )
        cast_training_params(transformer, dtype=torch.float32)
    elif cfg.mode == "full":
        transformer.requires_grad_(True)
    else:
        raise ValueError(f"unknown mode {cfg.mode!r}")
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return transformer


class Trainer:
    """One training run of :class:`TrainConfig`."""

    def __init__(self, cfg: TrainConfig):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        if cfg.model.base_dtype != "float32" and cfg.mixed_precision == "no":
            raise ValueError("a low-precision base_dtype needs mixed_precision (bf16 autocast)")
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
        )
        acc = self.accelerator
        set_seed(cfg.seed)
        self.cache_dir = Path(cfg.data.cache_dir or self.out / "cache")
        self.objective = FlowMatchObjective(cfg.objective)
        self.generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + acc.process_index)
        self.step, self.epoch, self.position = 0, 0, 0
        self.vae = None

        self.encoder_key = encoder_key(cfg.model.pretrained)
        self.samples = build_samples(
            cfg.data.dataset,
            cfg.data.buckets,
            self.cache_dir,
            self.encoder_key,
            cfg.model.text_max_length,
            cfg.data.repeat_by,
            cfg.data.frame_windows,
            cfg.data.window_stride,
            cfg.data.windows_per_clip,
        )
        if not self.samples:
            raise ValueError(f"no usable clips in {cfg.data.dataset}")
        self.prompt_embeds = self._prepare_cache()
        # The model is prepared before the optimizer exists, so FSDP's sharded parameters are optimised.
        self.model = acc.prepare(self._load_transformer())
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        logger.info("%s fine-tune: %d trainable parameters", cfg.model.mode, sum(p.numel() for p in self.params))

        self.optimizer = acc.prepare(
            torch.optim.AdamW(
                self.params,
                lr=cfg.optim.lr,
                betas=cfg.optim.betas,
                eps=cfg.optim.eps,
                weight_decay=cfg.optim.weight_decay,
            )
        )
        # Not passed to prepare(): accelerate would step it once per process.
        self.lr_scheduler = build_lr_scheduler(cfg.optim, self.optimizer, cfg.max_steps)
        acc.register_for_checkpointing(self.lr_scheduler)
        self.ema = None
        if cfg.ema_decay is not None:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=cfg.ema_decay)
            acc.register_for_checkpointing(self.ema)
        acc.register_save_state_pre_hook(self._save_hook)
        acc.register_load_state_pre_hook(self._load_hook)

        self.sampler = BucketBatchSampler(
            self.samples, cfg.batch_size, cfg.seed, acc.process_index, acc.num_processes,
            repeat=cfg.data.repeat, caption_dropout=cfg.data.caption_dropout,
        )  # fmt: skip
        if len(self.sampler) == 0:
            raise ValueError("fewer batches than processes: lower batch_size or add clips")
        dataset = CachedDataset(self.samples, self.prompt_embeds[""], cfg.model.text_max_length)
        self.loader = torch.utils.data.DataLoader(dataset, batch_sampler=self.sampler, num_workers=cfg.data.num_workers)

    # -- setup ---------------------------------------------------------------------------------

    def _prepare_cache(self) -> dict[str, torch.Tensor]:
        """Cache latents and prompt embeddings, then drop the text encoder (the VAE is kept on CPU
        only if validation needs it)."""
        from diffusers import WanPipeline

        cfg = self.cfg
        prompts_file = self.cache_dir / "prompts.safetensors"
        prompts = ["", *cfg.validation_prompts]
        cached = load_file(str(prompts_file)) if prompts_file.exists() else {}
        keys = {p: f"p{i}" for i, p in enumerate(prompts)}
        meta_file = self.cache_dir / "prompts.json"
        missing = [s for s in self.samples if not s.cache_file.exists()]
        ready = not missing and meta_file.exists() and json.loads(meta_file.read_text()) == [prompts, self.encoder_key]
        self.accelerator.wait_for_everyone()  # every rank decides before any rank writes
        if ready:
            return {p: cached[keys[p]] for p in prompts}
        pipe = WanPipeline.from_pretrained(
            cfg.model.pretrained,
            transformer=None,
            dtype={"text_encoder": _dtype(cfg.model.base_dtype), "default": torch.float32},
        )
        embeds = build_cache(
            self.accelerator,
            pipe,
            missing,
            self.cache_dir,
            cfg.model.text_max_length,
            cfg.validation_prompts,
            batch_size=cfg.data.cache_batch_size,
        )
        if self.accelerator.is_main_process:
            save_file({keys[p]: e.contiguous() for p, e in embeds.items()}, str(prompts_file))
            meta_file.write_text(json.dumps([prompts, self.encoder_key]))
        self.accelerator.wait_for_everyone()
        if cfg.validation_prompts:
            self.vae = pipe.vae.to("cpu")
        del pipe
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return embeds

    def _load_transformer(self):
        from diffusers import WanTransformer3DModel

        cfg = self.cfg.model
        dtype = _dtype(cfg.base_dtype) if cfg.mode == "lora" else torch.float32
        return prepare_transformer(
            WanTransformer3DModel.from_pretrained(cfg.pretrained, subfolder="transformer", dtype=dtype), cfg
        )

    # -- checkpoints ---------------------------------------------------------------------------

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        model = self.accelerator.unwrap_model(self.model)
        return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}

    def _save_hook(self, models, weights, output_dir):
        """Store only the trainable weights (not the frozen base) in DDP/single-process runs;
        FSDP and DeepSpeed save through their own paths and leave ``weights`` empty."""
        if not weights:
            return
        if self.accelerator.is_main_process:
            save_file(self._trainable_state(), str(Path(output_dir) / TRAINABLE_FILE))
        weights.clear()

    def _load_hook(self, models, input_dir):
        path = Path(input_dir) / TRAINABLE_FILE
        if not path.exists():
            return
        state = load_file(str(path))
        model = self.accelerator.unwrap_model(self.model)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(state) != trainable:
            raise ValueError(f"{path} does not match the model's trainable parameters")
        model.load_state_dict(state, strict=False)
        models.clear()

    def save_checkpoint(self) -> Path:
        """Resumable state plus a service-loadable export, written atomically (``.tmp`` then rename)."""
        acc = self.accelerator
        final = self.out / "checkpoints" / f"step-{self.step:07d}"
        tmp = final.with_name(final.name + ".tmp")
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        torch.save(
            {
                "step": self.step,
                "epoch": self.epoch,
                "position": self.position,
                "generator": self.generator.get_state(),
                "world_size": acc.num_processes,
            },
            tmp / f"trainer_state_{acc.process_index}.pt",
        )
        self.export(tmp / "export")
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            if self.cfg.keep_checkpoints:
                for old in sorted((self.out / "checkpoints").glob("step-[0-9]*[0-9]"))[: -self.cfg.keep_checkpoints]:
                    shutil.rmtree(old)
        acc.wait_for_everyone()
        logger.info("saved checkpoint %s", final)
        return final

    def load_checkpoint(self, path: Path) -> None:
        acc = self.accelerator
        acc.load_state(str(path))
        own = path / f"trainer_state_{acc.process_index}.pt"
        state = torch.load(own if own.exists() else path / "trainer_state_0.pt", weights_only=True)
        saved_world = state.get("world_size")
        # Checkpoints from before world_size was saved counted each rank's own batches.
        position = state["position"] if saved_world is not None else state["position"] * acc.num_processes
        self.step, self.epoch, self.position = state["step"], state["epoch"], position
        if own.exists():
            self.generator.set_state(state["generator"])
        else:  # a rank the checkpoint did not have: its own noise stream, seeded from the step
            self.generator.manual_seed(self.cfg.seed * 1_000_003 + acc.process_index + 7919 * self.step)
        if saved_world not in (None, acc.num_processes):
            logger.warning("resuming a %d-process checkpoint on %d processes: the global sample order continues at "
                           "batch %d of epoch %d, a step now takes %d micro-batches instead of %d (scale "
                           "grad_accum or the learning rate if the global batch should stay the same), and the noise "
                           "streams differ", saved_world, acc.num_processes, self.position, self.epoch,
                           acc.num_processes * self.cfg.grad_accum, saved_world * self.cfg.grad_accum)  # fmt: skip
        logger.info("resumed from %s at step %d (epoch %d, global batch %d)", path, self.step, self.epoch,
                    self.position)

    def export(self, out_dir: Path) -> Path:
        """Write the (EMA, if enabled) weights in the service's format: a PEFT LoRA
        ``pytorch_lora_weights.safetensors`` or a diffusers ``transformer/`` folder, plus
        ``microverse_checkpoint.json`` (and ``upstream.safetensors`` with ``write_upstream``)."""
        acc = self.accelerator
        cfg = self.cfg
        model = acc.unwrap_model(self.model)
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
        state = acc.get_state_dict(self.model)  # gathered from every rank under FSDP / ZeRO-3
        if acc.is_main_process:
            out_dir.mkdir(parents=True, exist_ok=True)
            if cfg.model.mode == "lora":
                from peft.utils import get_peft_model_state_dict

                lora = get_peft_model_state_dict(model, state_dict=state)
                save_diffusers_lora(lora, out_dir, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_targets)
                if cfg.write_upstream:
                    upstream = lora_diffusers_to_upstream(lora, cfg.model.lora_rank, cfg.model.lora_alpha)
            else:
                model.save_pretrained(out_dir / "transformer", state_dict=state)
                if cfg.write_upstream:
                    upstream = diffusers_to_original_keys(state)
            if cfg.write_upstream:
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in upstream.items()},
                    str(out_dir / f"step-{self.step}.safetensors"),
                )
            info = {
                "kind": cfg.model.mode,
                "base_model": cfg.model.pretrained,
                "step": self.step,
                "ema": self.ema is not None,
                "lora_rank": cfg.model.lora_rank if cfg.model.mode == "lora" else None,
                "lora_alpha": cfg.model.lora_alpha if cfg.model.mode == "lora" else None,
                "config": config_to_dict(cfg),
            }
            (out_dir / CHECKPOINT_INFO).write_text(json.dumps(info, indent=2))
        if self.ema is not None:
            self.ema.restore(self.params)
        return out_dir

    # -- training ------------------------------------------------------------------------------

    def _micro_batches(self):
        """Endless micro-batches; ``(epoch, position)`` always counts the global batches consumed (every rank takes
        one per micro-batch)."""
        while True:
            self.sampler.set_position(self.epoch, self.position)
            for batch in self.loader:
                self.position += self.accelerator.num_processes
                yield batch
            self.epoch, self.position = self.epoch + 1, 0

    def _loss(self, batch: dict) -> torch.Tensor:
        device = self.accelerator.device
        x0 = batch["latents"].to(device)
        noise = torch.randn(x0.shape, generator=self.generator).to(device)
        sigmas = self.objective.sample_sigmas(x0.shape[0], self.generator)
        x_t = self.objective.noisy_input(x0, noise, sigmas.to(device))
        pred = self.model(
            hidden_states=x_t,
            timestep=(sigmas * 1000).to(device),
            encoder_hidden_states=batch["prompt_embeds"].to(device),
            return_dict=False,
        )[0]
        return self.objective.loss(pred, x0, noise, sigmas)

    def _log(self, loss: float, grad_norm: float) -> None:
        lr = self.lr_scheduler.get_last_lr()[0]
        self.accelerator.log({"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm}, step=self.step)
        if self.accelerator.is_main_process:
            with open(self.out / "loss.csv", "a", newline="") as f:
                csv.writer(f).writerow([self.step, f"{loss:.6g}", f"{lr:.6g}", self.epoch, f"{grad_norm:.6g}"])

    def _truncate_csv(self) -> None:
        """Drop loss rows past the resumed step (a killed run may have logged beyond its checkpoint)."""
        path = self.out / "loss.csv"
        if not self.accelerator.is_main_process:
            return
        rows = list(csv.reader(path.open())) if path.exists() else []
        kept = [r for r in rows[1:] if int(r[0]) <= self.step]
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "loss", "lr", "epoch", "grad_norm"])
            w.writerows(kept)

    def train(self, until_step: int | None = None) -> Path:
        """Train to ``max_steps`` (or stop after ``until_step`` with a checkpoint, e.g. to fit a job's
        time limit); returns the final export folder, or the last checkpoint when stopped early."""
        cfg, acc = self.cfg, self.accelerator
        self._begin()
        target = min(cfg.max_steps, until_step or cfg.max_steps)
        batches = self._micro_batches()
        progress = tqdm(total=cfg.max_steps, initial=self.step, desc="training", disable=not acc.is_local_main_process)
        while self.step < target:
            total, grad_norm = self._optimizer_step(batches)
            self.step += 1
            progress.update(1)
            self._after_step(total, grad_norm, target, progress)
        progress.close()
        if self.step < cfg.max_steps:
            acc.end_training()
            return latest_checkpoint(self.out)
        return self._finish()

    def _begin(self) -> None:
        """Resume as ``cfg.resume`` says, save the config, trim the loss log to the resumed step, start trackers."""
        cfg, acc = self.cfg, self.accelerator
        resume = (
            None if cfg.resume == "none" else latest_checkpoint(self.out) if cfg.resume == "auto" else Path(cfg.resume)
        )
        if resume is not None:
            self.load_checkpoint(resume)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        self._truncate_csv()
        acc.init_trackers(cfg.name)

    def _optimizer_step(self, batches: Iterator[dict]) -> tuple[torch.Tensor, float]:
        """One optimizer step over ``grad_accum`` micro-batches (gradients synced on the last); returns their loss
        and the global gradient norm before clipping."""
        cfg, acc = self.cfg, self.accelerator
        self.model.train()
        total = torch.zeros((), device=acc.device)
        for i in range(cfg.grad_accum):
            sync = nullcontext() if i == cfg.grad_accum - 1 else acc.no_sync(self.model)
            with sync:
                loss = self._loss(next(batches))
                acc.backward(loss / cfg.grad_accum)
            total += loss.detach() / cfg.grad_accum
        # With no clipping asked for, an infinite limit still measures the norm and scales the gradients by 1.
        grad_norm = acc.clip_grad_norm_(self.params, cfg.optim.max_grad_norm or float("inf"))
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.params)
        return total, grad_norm

    def _after_step(self, total: torch.Tensor, grad_norm: float, target: int, progress: tqdm) -> None:
        """Log, checkpoint and validate when the new step calls for it."""
        cfg = self.cfg
        if self.step % cfg.log_every == 0:
            loss_value = self.accelerator.reduce(total, "mean").item()
            progress.set_postfix(loss=f"{loss_value:.4f}")
            self._log(loss_value, float(grad_norm))
        if self.step % cfg.checkpoint_every == 0 or self.step == target:
            self.save_checkpoint()
        if cfg.validation_every and self.step % cfg.validation_every == 0:
            self.validate()

    def _finish(self) -> Path:
        """At ``max_steps``: export, validate unless the last step just did, plot the loss; returns the export."""
        cfg, acc = self.cfg, self.accelerator
        final = self.export(self.out / "final")
        if cfg.validation_prompts and not (cfg.validation_every and self.step % cfg.validation_every == 0):
            self.validate()
        if acc.is_main_process:
            plot_loss(self.out / "loss.csv", self.out / "loss.png")
        acc.end_training()
        return final

    @torch.no_grad()
    def validate(self) -> list[Path]:
        """Render the validation prompts with the current (EMA) weights on the main process."""
        from accelerate.utils import DistributedType

        acc, cfg = self.accelerator, self.cfg
        paths = []
        if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            # Sharded weights: one process cannot run the DiT alone; render from the export instead.
            logger.warning(
                "validation videos are skipped under %s; render from the exported checkpoint", acc.distributed_type
            )
            return paths
        if acc.is_main_process and cfg.validation_prompts:
            from diffusers import WanPipeline

            model = acc.unwrap_model(self.model)
            if self.ema is not None:
                self.ema.store(self.params)
                self.ema.copy_to(self.params)
            if self.vae is None:
                from diffusers import AutoencoderKLWan

                self.vae = AutoencoderKLWan.from_pretrained(cfg.model.pretrained, subfolder="vae", dtype=torch.float32)
            pipe = WanPipeline.from_pretrained(
                cfg.model.pretrained, transformer=model, vae=self.vae.to(acc.device), text_encoder=None, tokenizer=None
            )
            pipe.set_progress_bar_config(disable=True)
            model.eval()
            frames, height, width = cfg.validation_shape
            negative = _pad(self.prompt_embeds[""], cfg.model.text_max_length).to(acc.device)
            out_dir = self.out / "validation" / f"step-{self.step:07d}"
            for i, prompt in enumerate(cfg.validation_prompts):
                with acc.autocast():
                    video = pipe(
                        prompt_embeds=_pad(self.prompt_embeds[prompt], cfg.model.text_max_length).to(acc.device),
                        negative_prompt_embeds=negative,
                        height=height, width=width, num_frames=frames,
                        num_inference_steps=cfg.validation_steps, guidance_scale=cfg.validation_guidance,
                        generator=torch.Generator().manual_seed(cfg.seed + i), output_type="np",
                    ).frames[0]  # fmt: skip
                clip = (video * 255).astype(np.uint8)  # float [0, 1] frames to uint8, as diffusers' export_to_video
                paths.append(write_mp4(out_dir / f"{i:02d}.mp4", clip, cfg.validation_fps))
            self.vae.to("cpu")
            if self.ema is not None:
                self.ema.restore(self.params)
            logger.info("validation videos in %s", out_dir)
        acc.wait_for_everyone()
        return paths


def _pad(emb: torch.Tensor, length: int) -> torch.Tensor:
    out = torch.zeros(1, length, emb.shape[-1])
    out[0, : emb.shape[0]] = emb[:length]
    return out


def plot_loss(csv_path: Path, png_path: Path) -> Path:
    """Loss per step and a moving average, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    steps = np.array([int(r["step"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, alpha=0.35, label="loss")
    window = max(1, len(loss) // 20)
    if len(loss) >= window:
        ax.plot(steps[window - 1 :], np.convolve(loss, np.ones(window) / window, "valid"), label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="flow-matching loss", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def train(cfg: TrainConfig, until_step: int | None = None) -> Path:
    """Build a :class:`Trainer` and run it (see :meth:`Trainer.train`)."""
    return Trainer(cfg).train(until_step=until_step)
