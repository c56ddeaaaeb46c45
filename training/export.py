"""Exports of trained checkpoints: service formats, upstream MicroVerse format, BentoML model store."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from training.convert import convert_checkpoint
from training.trainer import CHECKPOINT_INFO, latest_checkpoint

logger = logging.getLogger(__name__)


def resolve_export(path: str | Path) -> Path:
    """The export folder (with ``microverse_checkpoint.json``) of a run folder (its ``final/`` or
    latest checkpoint), a checkpoint folder, or an export folder itself."""
    path = Path(path)
    candidates = [path, path / "export", path / "final"]
    if (ckpt := latest_checkpoint(path)) is not None:
        candidates.append(ckpt / "export")
    for candidate in candidates:
        if (candidate / CHECKPOINT_INFO).exists():
            return candidate
    raise FileNotFoundError(f"no exported checkpoint ({CHECKPOINT_INFO}) under {path}")


def export_checkpoint(src: str | Path, dst: str | Path, fmt: str = "diffusers") -> Path:
    """Copy a checkpoint out in the service's ``diffusers`` format (LoRA
    ``pytorch_lora_weights.safetensors`` or ``transformer/`` folder), or write it as ``upstream``
    (one ``step-N.safetensors`` with original Wan keys); returns the written path."""
    export = resolve_export(src)
    info = json.loads((export / CHECKPOINT_INFO).read_text())
    dst = Path(dst)
    if fmt == "diffusers":
        shutil.copytree(export, dst, dirs_exist_ok=True)
        return dst
    if fmt != "upstream":
        raise ValueError(f"unknown format {fmt!r}")
    source = export / "transformer" if info["kind"] == "full" else export / "pytorch_lora_weights.safetensors"
    target = dst / f"step-{info['step']}.safetensors" if dst.suffix != ".safetensors" else dst
    return convert_checkpoint(source, target, to="upstream")


def export_bento(src: str | Path, name: str, labels: dict[str, str] | None = None) -> str:
    """Register a checkpoint in the BentoML model store (``$BENTOML_HOME``); returns the tag.

    The model folder holds the service-format export (``pytorch_lora_weights.safetensors`` or
    ``transformer/``) and ``microverse_checkpoint.json``; the tag's metadata carries kind, base model,
    step and LoRA rank/alpha.
    """
    import bentoml

    export = resolve_export(src)
    info = json.loads((export / CHECKPOINT_INFO).read_text())
    metadata = {k: v for k, v in info.items() if k != "config" and v is not None}
    with bentoml.models.create(name, labels={"kind": info["kind"], **(labels or {})}, metadata=metadata) as model:
        shutil.copytree(export, model.path, dirs_exist_ok=True)
    logger.info("registered %s in the BentoML model store", model.tag)
    return str(model.tag)
