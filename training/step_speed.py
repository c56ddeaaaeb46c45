"""Training step speed of the Wan DiT at a given size and clip shape, with random weights.

Measures what the trainer runs once latents and text embeddings are cached (neither VAE nor text
encoder resident): forward, flow-matching loss, backward and an AdamW step, under bf16 autocast.
Reports seconds per step and peak accelerator memory.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import trange

from training.config import ModelConfig, ObjectiveConfig
from training.objective import FlowMatchObjective
from training.trainer import prepare_transformer

logger = logging.getLogger(__name__)

#: ``WanTransformer3DModel`` sizes (Wan2.1-T2V configs). The text sequence is 512 UMT5 tokens.
SIZES = {
    "1.3b": dict(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                 freq_dim=256, ffn_dim=8960, num_layers=30),
    "14b": dict(num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                freq_dim=256, ffn_dim=13824, num_layers=40),
    "tiny": dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=32,
                 freq_dim=32, ffn_dim=64, num_layers=2),
}  # fmt: skip
TEXT_TOKENS = 512


def benchmark(
    size: str = "1.3b",
    shape: tuple[int, int, int] = (81, 480, 832),
    model: ModelConfig | None = None,
    steps: int = 5,
    warmup: int = 2,
    device: str | None = None,
) -> dict:
    """Time ``steps`` training steps (after ``warmup``) on random latents of a ``(frames, height,
    width)`` clip; returns seconds/step, peak memory and the setup."""
    from diffusers import WanTransformer3DModel

    model = model or ModelConfig(base_dtype="bfloat16", gradient_checkpointing=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kwargs = {**SIZES[size], "patch_size": (1, 2, 2), "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads"}
    torch.manual_seed(0)
    with device:
        transformer = WanTransformer3DModel(**kwargs)
    if model.mode == "lora":
        transformer.to(getattr(torch, model.base_dtype))
    transformer = prepare_transformer(transformer, model).train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    objective = FlowMatchObjective(ObjectiveConfig())
    frames, height, width = shape
    latent_shape = (1, kwargs["in_channels"], (frames - 1) // 4 + 1, height // 8, width // 8)
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(1, TEXT_TOKENS, kwargs["text_dim"], generator=generator).to(device)

    def step() -> float:
        x0 = torch.randn(latent_shape, generator=generator).to(device)
        noise = torch.randn(latent_shape, generator=generator).to(device)
        sigmas = objective.sample_sigmas(1, generator)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            x_t = objective.noisy_input(x0, noise, sigmas.to(device))
            pred = transformer(x_t, (sigmas * 1000).to(device), text, return_dict=False)[0]
        loss = objective.loss(pred, x0, noise, sigmas)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [step() for _ in trange(steps, desc=f"benchmark {size}")]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    result = {
        "size": size,
        "shape": list(shape),
        "latent_shape": list(latent_shape),
        "tokens": latent_shape[2] * (latent_shape[3] // 2) * (latent_shape[4] // 2),
        "mode": model.mode,
        "model": {k: v for k, v in asdict(model).items() if k != "pretrained"},
        "parameters": sum(p.numel() for p in transformer.parameters()),
        "trainable_parameters": sum(p.numel() for p in params),
        "seconds_per_step": seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "final_loss": losses[-1],
    }
    logger.info("benchmark: %.3f s/step, peak %s GiB on %s", seconds, result["peak_memory_gib"], result["device"])
    return result


def write_result(result: dict, path: str | Path) -> Path:
    """Save a benchmark result as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path
