"""Wan2.1 fine-tuning (LoRA via peft, or full) with accelerate: one CPU, one GPU, N GPUs, N nodes.

Run with ``microverse train --config CONFIG`` (wrap in ``accelerate launch`` for several processes;
FSDP and DeepSpeed come from the accelerate config file). Output layout::

    <output_dir>/checkpoints/step-0000100/   accelerate state (trainable weights, optimizer, RNG,
                                             LR schedule, EMA; under FSDP sharded/ + schedule.pt)
                                             + trainer_state_<rank>.pt (global data position)
                                             + export/ (service format)
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
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from media.video import write_mp4
from training.conditioning import (
    conditioning_kind,
    encode_condition,
    first_frame_image,
    image_pipeline,
    model_inputs,
)
from training.config import ModelConfig, OptimConfig, TrainConfig, config_to_dict, save_config
from training.convert import (
    diffusers_to_original_keys,
    lora_diffusers_to_kohya,
    lora_diffusers_to_upstream,
    save_diffusers_lora,
)
from training.dataset import (
    BucketBatchSampler,
    CachedDataset,
    build_cache,
    build_samples,
    dataset_sizes,
    derive_buckets,
    encoder_key,
    load_clip,
)
from training.objective import FlowMatchObjective

logger = logging.getLogger(__name__)

TRAINABLE_FILE = "trainable.safetensors"
CHECKPOINT_INFO = "microverse_checkpoint.json"
COMFYUI_LORA_FILE = "comfyui_lora.safetensors"  # LoRA exports with write_comfyui: kohya / musubi-tuner keys
SHARDED_DIR = "sharded"  # FSDP checkpoints: torch.distributed.checkpoint shards of the trainable state
SCHEDULE_FILE = "schedule.pt"  # FSDP checkpoints: LR schedule and EMA settings


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


def build_accelerator(cfg: TrainConfig):
    """The run's ``Accelerator``: gradient accumulation owned by accelerate (DeepSpeed's engine steps by it too),
    the configured trackers, and FSDP on CPU processes when the launch asks for FSDP.

    accelerate (<= 1.16) turns FSDP on only for accelerator devices and runs a CPU launch as plain DDP, although
    torch's ``fully_shard`` (FSDP2) shards over gloo; with ``ACCELERATE_USE_FSDP`` set on CPU the state is switched
    to FSDP with the plugin the launch configured, so a CPU cluster, and the 2-rank test, run the sharded path."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import (
        DistributedType,
        FullyShardedDataParallelPlugin,
        GradientAccumulationPlugin,
        ProjectConfiguration,
        parse_flag_from_env,
    )

    acc = Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with=list(cfg.trackers) or None,
        project_config=ProjectConfiguration(project_dir=str(cfg.output_dir), logging_dir=f"{cfg.output_dir}/logs"),
        # Steps span epochs (the sampler continues the global order), so the loader's end must not force a step.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.grad_accum, sync_with_dataloader=False),
        step_scheduler_with_optimizer=False,  # stepped once per optimizer step below, whatever the world size
    )
    state = acc.state
    if state.distributed_type == DistributedType.MULTI_CPU and parse_flag_from_env("ACCELERATE_USE_FSDP"):
        # Both singletons: AcceleratorState copies PartialState's type each time it is instantiated.
        state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin()
        if cfg.mixed_precision != "no":
            state.fsdp_plugin.set_mixed_precision(cfg.mixed_precision)
    return acc


def _sharded(acc) -> bool:
    """Whether the weights are sharded over processes (FSDP or DeepSpeed), so no process holds them whole."""
    from accelerate.utils import DistributedType

    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


class Trainer:
    """One training run of :class:`TrainConfig`."""

    def __init__(self, cfg: TrainConfig):
        from accelerate.utils import set_seed

        if cfg.model.base_dtype != "float32" and cfg.mixed_precision == "no":
            raise ValueError("a low-precision base_dtype needs mixed_precision (bf16 autocast)")
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.accelerator = acc = build_accelerator(cfg)
        set_seed(cfg.seed)
        self.cache_dir = Path(cfg.data.cache_dir or self.out / "cache")
        self.objective = FlowMatchObjective(cfg.objective)
        self.step, self.epoch, self.position = 0, 0, 0
        self.vae = None

        self.kind = conditioning_kind(cfg.model.pretrained)  # image conditioning (training.conditioning)
        self.encoder_key = encoder_key(cfg.model.pretrained)
        self.buckets = self._buckets()
        self.samples = [
            sample
            for folder, weight in {cfg.data.dataset: 1, **cfg.data.datasets}.items()
            for sample in self._samples_of(folder, weight)
        ]
        if not self.samples:
            raise ValueError(f"no usable clips in {cfg.data.dataset}")
        self.val_samples = self._samples_of(cfg.data.validation_dataset, 1) if cfg.data.validation_dataset else []
        if cfg.validation_loss_every and not self.val_samples:
            raise ValueError("validation_loss_every needs data.validation_dataset with usable clips")
        self.prompt_embeds = self._prepare_cache()
        # Global batches in order; the prepared loader deals them round-robin to the ranks.
        self.sampler = BucketBatchSampler(
            self.samples, cfg.batch_size, cfg.seed, None, acc.num_processes,
            repeat=cfg.data.repeat, caption_dropout=cfg.data.caption_dropout,
        )  # fmt: skip
        if len(self.sampler) == 0:
            raise ValueError("fewer batches than processes: lower batch_size or add clips")
        dataset = CachedDataset(self.samples, self.prompt_embeds[""], cfg.model.text_max_length)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=self.sampler, num_workers=cfg.data.num_workers)
        model = self._load_transformer()
        self.patch_size = tuple(model.config.patch_size)
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=cfg.optim.lr,
            betas=cfg.optim.betas,
            eps=cfg.optim.eps,
            weight_decay=cfg.optim.weight_decay,
        )
        # One prepare, as accelerate documents: DeepSpeed builds its engine around model and optimizer together and
        # reads the micro-batch size from the loader; FSDP2 re-points the optimizer at the sharded parameters.
        self.model, self.optimizer, self.loader, self.lr_scheduler = acc.prepare(
            model, optimizer, loader, build_lr_scheduler(cfg.optim, optimizer, cfg.max_steps)
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        logger.info("%s fine-tune: %d trainable parameters", cfg.model.mode, sum(p.numel() for p in self.params))
        self.ema = None
        if cfg.ema_decay is not None:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=cfg.ema_decay)  # sharded like the weights under FSDP
            acc.register_for_checkpointing(self.ema)
        acc.register_save_state_pre_hook(self._save_hook)
        acc.register_load_state_pre_hook(self._load_hook)

    # -- setup ---------------------------------------------------------------------------------

    def _buckets(self) -> tuple[tuple[int, int, int], ...]:
        """``data.buckets``, or with ``data.bucket_area`` the shapes of the training clips at that area."""
        data = self.cfg.data
        if data.bucket_area is None:
            return data.buckets
        sizes = [size for folder in (data.dataset, *data.datasets) for size in dataset_sizes(folder)]
        buckets = derive_buckets(sizes, [f for f, _, _ in data.buckets], data.bucket_area, data.bucket_multiple)
        logger.info("buckets from the data (%d clips): %s", len(sizes), buckets)
        return buckets

    def _samples_of(self, folder: str, weight: int) -> list:
        """The samples (windows, buckets, cache files) of one dataset folder, each drawn ``weight`` times more."""
        cfg = self.cfg
        if weight < 1:
            raise ValueError(f"data.datasets: weight of {folder} must be a whole number >= 1, got {weight}")
        samples = build_samples(folder, self.buckets, self.cache_dir, self.encoder_key, cfg.model.text_max_length,
                                cfg.data.repeat_by, cfg.data.frame_windows, cfg.data.window_stride,
                                cfg.data.windows_per_clip)  # fmt: skip
        for sample in samples:
            sample.repeat *= weight
        return samples

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
        missing = list({s.cache_file: s for s in self.samples + self.val_samples if not s.cache_file.exists()}.values())
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
            condition=self._condition_encoder(pipe),
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

    def _condition_encoder(self, pipe):
        """What caches an image-conditioned model's first-frame condition for a clip (None when the model needs
        nothing beyond the latents: text-to-video, and TI2V, which conditions on the clip's own first latent frame)."""
        if self.kind != "channels":
            return None
        image_pipe = image_pipeline(self.cfg.model.pretrained, vae=pipe.vae)
        if getattr(image_pipe, "image_encoder", None) is not None:
            image_pipe.image_encoder.to(self.accelerator.device)
        return lambda clip: encode_condition(image_pipe, self.kind, clip)

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

    def _sharded_state(self) -> dict:
        """Trainable weights, optimizer state and EMA as torch.distributed.checkpoint state (each rank's shards
        under FSDP, whole tensors in one process; never the frozen base)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model, optim = get_state_dict(self.model, self.optimizer, options=StateDictOptions(ignore_frozen_params=True))
        state = {"model": model, "optim": optim}
        if self.ema is not None:
            state["ema"] = {str(i): t for i, t in enumerate(self.ema.shadow_params)}
        return state

    def _save_state(self, path: Path) -> None:
        """accelerate's state, except under FSDP, whose accelerate save stores the whole frozen base of a LoRA run
        and the EMA of rank 0's shards only: there every rank writes its shards of the trainable weights, optimizer
        and EMA to one torch.distributed.checkpoint folder (resumable on any number of processes), plus the
        schedule."""
        import torch.distributed.checkpoint as dcp
        from accelerate.utils import DistributedType

        acc = self.accelerator
        if acc.distributed_type != DistributedType.FSDP:
            acc.save_state(str(path))
            return
        dcp.save(self._sharded_state(), checkpoint_id=str(path / SHARDED_DIR))
        if acc.is_main_process:
            ema = {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"} if self.ema else None
            torch.save({"lr_scheduler": self.lr_scheduler.state_dict(), "ema": ema}, path / SCHEDULE_FILE)

    def _load_state(self, path: Path) -> None:
        """Load what :meth:`_save_state` wrote (a sharded checkpoint reshards to this run's processes)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        if not (path / SHARDED_DIR).exists():
            self.accelerator.load_state(str(path))
            return
        state = self._sharded_state()
        dcp.load(state, checkpoint_id=str(path / SHARDED_DIR))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))  # fmt: skip
        meta = torch.load(path / SCHEDULE_FILE, weights_only=True)
        self.lr_scheduler.load_state_dict(meta["lr_scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict({**meta["ema"], "shadow_params": self.ema.shadow_params})  # loaded in place

    def save_checkpoint(self) -> Path:
        """Resumable state plus a service-loadable export, written atomically (``.tmp`` then rename)."""
        acc = self.accelerator
        final = self.out / "checkpoints" / f"step-{self.step:07d}"
        tmp = final.with_name(final.name + ".tmp")
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        self._save_state(tmp)
        torch.save(
            {
                "step": self.step,
                "epoch": self.epoch,
                "position": self.position,
                "world_size": acc.num_processes,
            },
            tmp / f"trainer_state_{acc.process_index}.pt",
        )
        if self.cfg.export_every is None or self.step % self.cfg.export_every == 0:
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
        self._load_state(path)
        own = path / f"trainer_state_{acc.process_index}.pt"
        state = torch.load(own if own.exists() else path / "trainer_state_0.pt", weights_only=True)
        saved_world = state.get("world_size")
        # Checkpoints from before world_size was saved counted each rank's own batches.
        position = state["position"] if saved_world is not None else state["position"] * acc.num_processes
        self.step, self.epoch, self.position = state["step"], state["epoch"], position
        if saved_world not in (None, acc.num_processes):
            logger.warning(
                "resuming a %d-process checkpoint on %d processes: the global sample order continues at batch %d of "
                "epoch %d, a step now takes %d micro-batches instead of %d (scale grad_accum or the learning rate if "
                "the global batch should stay the same)", saved_world, acc.num_processes, self.position, self.epoch,
                acc.num_processes * self.cfg.grad_accum, saved_world * self.cfg.grad_accum,
            )  # fmt: skip
        logger.info("resumed from %s at step %d (epoch %d, global batch %d)", path, self.step, self.epoch,
                    self.position)

    def export(self, out_dir: Path) -> Path:
        """Write the (EMA, if enabled) weights in the service's format, in ``export_dtype``: a PEFT LoRA
        ``pytorch_lora_weights.safetensors`` or a diffusers ``transformer/`` folder, plus
        ``microverse_checkpoint.json`` (and ``step-N.safetensors`` in upstream keys with ``write_upstream``). Every
        process takes part (the weights are gathered from their shards); the main process writes."""
        acc, cfg = self.accelerator, self.cfg
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
        state = acc.get_state_dict(self.model)  # gathered from every rank under FSDP / ZeRO-3
        if cfg.model.mode == "lora":
            from peft.utils import get_peft_model_state_dict

            state = get_peft_model_state_dict(acc.unwrap_model(self.model), state_dict=state)
        dtype = _dtype(cfg.export_dtype)
        # Copies (the unsharded state dict holds the live parameters, which get their raw values back below).
        state = {k: v.detach().to("cpu", dtype, copy=True).contiguous() for k, v in state.items()}
        if self.ema is not None:
            self.ema.restore(self.params)
        if not acc.is_main_process:
            return out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        if cfg.model.mode == "lora":
            save_diffusers_lora(state, out_dir, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_targets)
            upstream = lora_diffusers_to_upstream(state, cfg.model.lora_rank, cfg.model.lora_alpha)
            if cfg.write_comfyui:
                save_file(lora_diffusers_to_kohya(state, cfg.model.lora_alpha), str(out_dir / COMFYUI_LORA_FILE))
        else:
            _save_transformer(acc.unwrap_model(self.model), state, out_dir / "transformer")
            upstream = diffusers_to_original_keys(state)
        if cfg.write_upstream:
            save_file({k: v.contiguous() for k, v in upstream.items()}, str(out_dir / f"step-{self.step}.safetensors"))
        info = {
            "kind": cfg.model.mode,
            "base_model": cfg.model.pretrained,
            "step": self.step,
            "ema": self.ema is not None,
            "dtype": cfg.export_dtype,
            "lora_rank": cfg.model.lora_rank if cfg.model.mode == "lora" else None,
            "lora_alpha": cfg.model.lora_alpha if cfg.model.mode == "lora" else None,
            "config": config_to_dict(cfg),
        }
        (out_dir / CHECKPOINT_INFO).write_text(json.dumps(info, indent=2))
        return out_dir

    # -- training ------------------------------------------------------------------------------

    def _micro_batches(self):
        """Endless micro-batches; ``(epoch, position)`` always counts the global batches consumed (every rank takes
        one per micro-batch)."""
        while True:
            self.sampler.set_position(self.epoch, self.position)
            for batch in self.loader:
                batch["noise_seed"] = self._noise_seed(self.epoch, self.position + self.accelerator.process_index)
                self.position += self.accelerator.num_processes
                yield batch
            self.epoch, self.position = self.epoch + 1, 0

    def _noise_seed(self, epoch: int, index: int) -> int:
        """Seed of the noise and timesteps of global batch ``index`` of ``epoch``: a batch trains on the same draw
        whichever rank takes it, so N ranks match one process accumulating N micro-batches, and a resumed run
        (on any number of processes) continues as the uninterrupted one."""
        return ((self.cfg.seed * 1_000_003 + epoch) * 10_000_019 + index) % 2**63

    def _loss(self, batch: dict) -> torch.Tensor:
        device = self.accelerator.device
        x0 = batch["latents"].to(device)
        generator = torch.Generator().manual_seed(batch["noise_seed"])
        noise = torch.randn(x0.shape, generator=generator).to(device)
        sigmas = self.objective.sample_sigmas(x0.shape[0], generator)
        x_t = self.objective.noisy_input(x0, noise, sigmas.to(device))
        cond = {k: batch[k].to(device) for k in ("condition", "image_embeds") if k in batch}
        hidden, timestep, extra, mask = model_inputs(self.kind, x_t, x0, sigmas.to(device), cond, self.patch_size)
        pred = self.model(
            hidden_states=hidden,
            timestep=timestep,
            encoder_hidden_states=batch["prompt_embeds"].to(device),
            return_dict=False,
            **extra,
        )[0]
        return self.objective.loss(pred, x0, noise, sigmas, mask)

    @torch.no_grad()
    def validation_loss(self) -> dict[str, float]:
        """Mean flow-matching loss (unweighted) of the held-out clips at each of ``validation_sigmas``, with noise
        fixed per clip and level; each rank takes a share of the clips (every rank runs as many forwards, as
        sharded weights need) and the sums are reduced. Logged as ``val/...`` and to ``val_loss.csv``."""
        from training.objective import masked_mse

        acc, cfg = self.accelerator, self.cfg
        dataset = CachedDataset(self.val_samples, self.prompt_embeds[""], cfg.model.text_max_length)
        per_rank = -(-len(self.val_samples) // acc.num_processes)
        sums = torch.zeros(len(cfg.validation_sigmas) + 1, device=acc.device)  # per level, then the clip count
        self.model.eval()
        for j in range(per_rank):
            index = j * acc.num_processes + acc.process_index
            real = index < len(self.val_samples)
            item = {k: v[None].to(acc.device) for k, v in dataset[(index if real else 0, False)].items()}
            for level, sigma in enumerate(cfg.validation_sigmas):
                generator = torch.Generator().manual_seed(cfg.seed * 7919 + index * 101 + level)
                x0 = item["latents"]
                noise = torch.randn(x0.shape, generator=generator).to(acc.device)
                sigmas = torch.full((1,), float(sigma), device=acc.device)
                x_t = self.objective.noisy_input(x0, noise, sigmas)
                cond = {k: item[k] for k in ("condition", "image_embeds") if k in item}
                hidden, timestep, extra, mask = model_inputs(self.kind, x_t, x0, sigmas, cond, self.patch_size)
                with acc.autocast():
                    pred = self.model(hidden_states=hidden, timestep=timestep, return_dict=False,
                                      encoder_hidden_states=item["prompt_embeds"], **extra)[0]  # fmt: skip
                sums[level] += masked_mse(pred, noise - x0, mask)[0] * real
            sums[-1] += real
        sums = acc.reduce(sums, "sum")
        self.model.train()
        levels = {f"val/loss_{s:g}": (sums[i] / sums[-1]).item() for i, s in enumerate(cfg.validation_sigmas)}
        metrics = {"val/loss": sum(levels.values()) / len(levels), **levels}
        acc.log(metrics, step=self.step)
        if acc.is_main_process:
            path = self.out / "val_loss.csv"
            with open(path, "a", newline="") as f:
                writer = csv.writer(f)
                if f.tell() == 0:
                    writer.writerow(["step", *(k.removeprefix("val/") for k in metrics)])
                writer.writerow([self.step, *(f"{v:.6g}" for v in metrics.values())])
        logger.info("step %d: held-out loss %.5f", self.step, metrics["val/loss"])
        return metrics

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
        val = self.out / "val_loss.csv"
        if val.exists():  # held-out losses past the resumed step are measured again
            rows = list(csv.reader(val.open()))
            with open(val, "w", newline="") as f:
                csv.writer(f).writerows(rows[:1] + [r for r in rows[1:] if int(r[0]) <= self.step])

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
        if cfg.validation_loss_every and self.step == 0:
            self.validation_loss()

    def _optimizer_step(self, batches: Iterator[dict]) -> tuple[torch.Tensor, float]:
        """One optimizer step over ``grad_accum`` micro-batches (accelerate syncs the gradients and scales the loss
        on the last); returns their loss and the global gradient norm before clipping (over every shard)."""
        cfg, acc = self.cfg, self.accelerator
        self.model.train()
        total = torch.zeros((), device=acc.device)
        for _ in range(cfg.grad_accum):
            with acc.accumulate(self.model):
                loss = self._loss(next(batches))
                acc.backward(loss)
            total += loss.detach() / cfg.grad_accum
        if not acc.sync_gradients:
            raise RuntimeError("gradient accumulation is out of step with grad_accum")
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
        if cfg.validation_loss_every and (self.step % cfg.validation_loss_every == 0 or self.step == cfg.max_steps):
            self.validation_loss()

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
        """Render the validation prompts with the current (EMA) weights, the prompts dealt round-robin to the ranks
        (every rank runs as many pipelines, which sharded weights need, padding with a discarded render) and stopped
        for all ranks alike once ``validation_timeout`` has passed. Image-conditioned models start from the first
        frame of the first held-out (else training) clip. Returns this rank's videos."""
        from accelerate.utils import DistributedType

        acc, cfg = self.accelerator, self.cfg
        if not cfg.validation_prompts:
            return []
        if acc.distributed_type == DistributedType.DEEPSPEED:
            logger.warning("validation videos are skipped under DeepSpeed; render from the exported checkpoint")
            return []
        pipe, extra = self._validation_pipeline()
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
        self.model.eval()
        n, rank = acc.num_processes, acc.process_index
        prompts = list(enumerate(cfg.validation_prompts))
        mine = [prompts[j * n + rank] if j * n + rank < len(prompts) else None for j in range(-(-len(prompts) // n))]
        out_dir = self.out / "validation" / f"step-{self.step:07d}"
        paths, start = [], time.monotonic()
        for done, item in enumerate(mine):
            if self._slowest_elapsed(start) > cfg.validation_timeout:
                logger.warning("validation stopped after %d of %d renders per rank: validation_timeout (%g s)", done,
                               len(mine), cfg.validation_timeout)  # fmt: skip
                break
            index, prompt = item or prompts[0]
            video = (self._render(pipe, prompt, index, extra) * 255).astype(np.uint8)  # as diffusers' export_to_video
            if item is not None:
                paths.append(write_mp4(out_dir / f"{index:02d}.mp4", video, cfg.validation_fps))
        self.vae.to("cpu")
        if self.ema is not None:
            self.ema.restore(self.params)
        self.model.train()
        acc.wait_for_everyone()
        logger.info("validation videos in %s", out_dir)
        return paths

    def _slowest_elapsed(self, start: float) -> float:
        """Seconds since ``start`` on the slowest rank (so every rank decides alike whether to go on)."""
        elapsed = torch.tensor(time.monotonic() - start, dtype=torch.float64, device=self.accelerator.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
        return float(elapsed)

    def _validation_pipeline(self):
        """The diffusers pipeline that renders validation videos with the training model (``WanPipeline``, or
        ``WanImageToVideoPipeline`` for image-conditioned models), and its extra call arguments (the image)."""
        from diffusers import AutoencoderKLWan, WanPipeline

        acc, cfg = self.accelerator, self.cfg
        if self.vae is None:
            self.vae = AutoencoderKLWan.from_pretrained(cfg.model.pretrained, subfolder="vae", dtype=torch.float32)
        model, vae = acc.unwrap_model(self.model), self.vae.to(acc.device)
        if self.kind == "none":
            pipe, extra = WanPipeline.from_pretrained(cfg.model.pretrained, transformer=model, vae=vae,
                                                      text_encoder=None, tokenizer=None), {}  # fmt: skip
        else:
            pipe = image_pipeline(cfg.model.pretrained, transformer=model, vae=vae)
            if getattr(pipe, "image_encoder", None) is not None:
                pipe.image_encoder.to(acc.device)
            extra = {"image": first_frame_image(load_clip((self.val_samples or self.samples)[0]))}
        pipe.set_progress_bar_config(disable=True)
        return pipe, extra

    def _render(self, pipe, prompt: str, index: int, extra: dict) -> np.ndarray:
        """One validation video as float frames in [0, 1]."""
        acc, cfg = self.accelerator, self.cfg
        frames, height, width = cfg.validation_shape
        with acc.autocast():
            return pipe(
                prompt_embeds=_pad(self.prompt_embeds[prompt], cfg.model.text_max_length).to(acc.device),
                negative_prompt_embeds=_pad(self.prompt_embeds[""], cfg.model.text_max_length).to(acc.device),
                height=height, width=width, num_frames=frames,
                num_inference_steps=cfg.validation_steps, guidance_scale=cfg.validation_guidance,
                generator=torch.Generator().manual_seed(cfg.seed + index), output_type="np", **extra,
            ).frames[0]  # fmt: skip


def _save_transformer(model, state: dict[str, torch.Tensor], path: Path) -> None:
    """A diffusers ``transformer/`` folder of ``state`` (diffusers' own ``save_pretrained`` would save the model's
    local, possibly sharded, ``state_dict()`` instead), in 10 GB safetensors shards with an index beyond that."""
    from huggingface_hub import save_torch_state_dict

    path.mkdir(parents=True, exist_ok=True)
    model.save_config(path)
    save_torch_state_dict(state, path, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                          max_shard_size="10GB")  # fmt: skip


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
