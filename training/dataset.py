"""Training data: upstream ``metadata.json``, frame/resolution buckets, and the latent cache.

VAE latents and text embeddings are computed once (sharded over processes) and cached as
safetensors, so neither the VAE nor the text encoder is resident while the DiT trains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from media.video import probe_video, read_video, resize_crop

logger = logging.getLogger(__name__)

@dataclass
class Sample:
    """One row of ``metadata.json`` with its bucket and cache file."""

    id: str
    """Clip id (``id`` field, else the video path)."""
    video: Path
    """Absolute path of the clip."""
    prompt: str
    """Caption."""
    bucket: tuple[int, int, int]
    """``(frames, height, width)`` it trains at."""
    cache_file: Path
    """Cached latents and prompt embedding."""
    repeat: int = 1
    """Times per epoch this clip is drawn (before ``DataConfig.repeat``)."""
    start: int = 0
    """First frame of the window this sample trains on."""


def read_metadata(dataset: str | Path) -> list[dict]:
    """Rows of ``<dataset>/metadata.json`` (a JSON array of ``{id?, video, prompt, ...}``)."""
    rows = json.loads((Path(dataset) / "metadata.json").read_text())
    if not isinstance(rows, list) or not all("video" in r and "prompt" in r for r in rows):
        raise ValueError(f"{dataset}/metadata.json must be a list of objects with 'video' and 'prompt'")
    return rows


def choose_bucket(
    num_frames: int, height: int, width: int, buckets: tuple[tuple[int, int, int], ...]
) -> tuple[int, int, int] | None:
    """Closest-aspect bucket among those whose frame count fits the clip (longest first)."""
    fitting = [b for b in buckets if b[0] <= num_frames]
    if not fitting:
        return None
    longest = max(b[0] for b in fitting)
    aspect = width / height
    return min((b for b in fitting if b[0] == longest), key=lambda b: abs(b[2] / b[1] - aspect))


def _clip_size(row: dict, video: Path) -> tuple[int, int, int]:
    """Frames, height and width of a clip: from its metadata row (the data pipeline writes them), else probed."""
    if all(row.get(k) for k in ("frames", "height", "width")):
        return row["frames"], row["height"], row["width"]
    info = probe_video(video)
    return info.frames, info.height, info.width


def dataset_sizes(dataset: str | Path) -> list[tuple[int, int, int]]:
    """``(frames, height, width)`` of every clip of a dataset folder."""
    dataset = Path(dataset)
    return [_clip_size(row, (dataset / row["video"]).resolve()) for row in read_metadata(dataset)]


def derive_buckets(sizes, frame_counts, area: int, multiple: int = 16, most: int = 8) -> tuple[tuple[int, ...], ...]:
    """Buckets from the clips' own aspect ratios: each clip's aspect at about ``area`` pixels, both sides rounded to
    ``multiple`` (16: the Wan VAE's 8x times the DiT's 2x patch), the ``most`` commonest shapes kept, each with every
    frame count of ``frame_counts``."""
    shapes: Counter = Counter()
    for _, height, width in sizes:
        aspect = width / height
        h = max(multiple, round(math.sqrt(area / aspect) / multiple) * multiple)
        w = max(multiple, round(math.sqrt(area * aspect) / multiple) * multiple)
        shapes[(h, w)] += 1
    kept = sorted(shape for shape, _ in shapes.most_common(most))
    return tuple((f, h, w) for f in sorted(set(frame_counts)) for h, w in kept)


def encoder_key(pretrained: str | Path) -> str:
    """What the cached latents and prompt embeddings depend on in ``pretrained``: for a local folder its
    resolved path and the size and mtime of every VAE and text-encoder file (a rebuilt or moved folder
    is noticed); for a Hugging Face id, the id."""
    root = Path(pretrained)
    if not root.is_dir():
        return str(pretrained)
    files = sorted(f for sub in ("vae", "text_encoder", "tokenizer") for f in (root / sub).rglob("*") if f.is_file())
    stats = [(str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return json.dumps([str(root.resolve()), stats])


def clip_repeat(row: dict, repeat_by: dict[str, dict[str, int]]) -> int:
    """Times per epoch a metadata row is drawn under ``repeat_by`` (see ``DataConfig.repeat_by``)."""
    n = 1
    for key, counts in repeat_by.items():
        value = row.get(key)
        if value is not None and str(value) in counts:
            n *= int(counts[str(value)])
    return n


FRAME_WINDOWS = ("head", "chunk", "slide", "uniform")
"""Ways to cut samples out of a clip longer than its bucket (``DataConfig.frame_windows``)."""


def window_starts(n_frames: int, frames: int, mode: str = "head", stride: int | None = None,
                  most: int = 4) -> list[int]:  # fmt: skip
    """First frames of the ``frames``-long windows of an ``n_frames`` clip under ``mode`` (see
    ``DataConfig.frame_windows``); ``most`` caps the windows of ``chunk``/``slide`` and sets those of ``uniform``."""
    if mode not in FRAME_WINDOWS:
        raise ValueError(f"data.frame_windows must be one of {', '.join(FRAME_WINDOWS)}, got {mode!r}")
    last = n_frames - frames
    if last < 0:
        return []
    if mode == "head" or last == 0:
        return [0]
    if mode == "uniform":
        count = max(1, min(most, last + 1))
        return sorted({round(i * last / max(count - 1, 1)) for i in range(count)})
    step = frames if mode == "chunk" else (stride or max(1, frames // 2))
    if step < 1:
        raise ValueError(f"data.window_stride must be at least 1, got {step}")
    return list(range(0, last + 1, step))[:most]


def build_samples(
    dataset: str | Path, buckets, cache_dir: Path, model_key: str, text_max_length: int, repeat_by=None,
    windows: str = "head", window_stride: int | None = None, windows_per_clip: int = 4,
) -> list[Sample]:
    """Samples of the dataset with buckets, frame windows, cache paths and per-clip repeats (clips fitting no
    bucket are skipped).

    ``model_key`` (see :func:`encoder_key`) is part of each cache file's name."""
    dataset = Path(dataset)
    samples = []
    for row in read_metadata(dataset):
        video = (dataset / row["video"]).resolve()
        size = _clip_size(row, video)
        bucket = choose_bucket(*size, buckets)
        if bucket is None:
            logger.warning("skipping %s: shorter than every bucket", video)
            continue
        clip_id = str(row.get("id") or row["video"])
        starts = window_starts(size[0], bucket[0], windows, window_stride, windows_per_clip)
        for start in starts:
            key = [str(video), video.stat().st_mtime_ns, row["prompt"], bucket, model_key, text_max_length]
            digest = hashlib.sha1(json.dumps(key + ([start] if start else [])).encode()).hexdigest()[:16]
            samples.append(Sample(clip_id if len(starts) == 1 else f"{clip_id}#{start}", video, row["prompt"],
                                  bucket, cache_dir / f"{digest}.safetensors", clip_repeat(row, repeat_by or {}),
                                  start))  # fmt: skip
    return samples


def load_clip(sample: Sample) -> torch.Tensor:
    """The sample's window of its clip as ``[3, F, H, W]`` in [-1, 1] at its bucket size."""
    frames, h, w = sample.bucket
    video, _ = read_video(sample.video)
    video = resize_crop(video[sample.start : sample.start + frames], h, w)
    return torch.from_numpy(video).permute(3, 0, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], max_length: int, device) -> list[torch.Tensor]:
    """UMT5 embeddings trimmed to each prompt's tokens (padded back to ``max_length`` when batched)."""
    out = []
    for prompt in prompts:
        tokens = pipe.tokenizer(
            prompt, max_length=max_length, truncation=True, add_special_tokens=True, return_tensors="pt"
        )
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        emb = pipe.text_encoder(ids, mask).last_hidden_state[0, : int(mask.sum())]
        out.append(emb.float().cpu())
    return out


@torch.no_grad()
def encode_latents(vae, videos: torch.Tensor) -> torch.Tensor:
    """Normalised Wan VAE latent means ``(mu - latents_mean) / latents_std`` of a ``[B, 3, F, H, W]`` batch of
    same-size clips (one encode for the batch: about twice as fast per clip on CPU as one by one)."""
    mu = vae.encode(videos.to(vae.device, vae.dtype)).latent_dist.mode().float()
    mean = torch.tensor(vae.config.latents_mean, device=mu.device).view(-1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=mu.device).view(-1, 1, 1, 1)
    return ((mu - mean) / std).cpu()


def build_cache(
    accelerator, pipe, missing: list[Sample], cache_dir: Path, text_max_length: int, extra_prompts=(),
    batch_size: int = 1,
    condition=None,
) -> dict[str, torch.Tensor]:
    """Encode the ``missing`` samples (the same list on every rank, sharded over processes, ``batch_size``
    same-bucket clips per VAE encode) and the empty and extra prompts; ``condition(clip)`` gives tensors cached
    beside a clip's latents (an image-conditioned model's first-frame condition). Returns the prompt embeddings
    keyed by prompt."""
    if batch_size < 1:
        raise ValueError(f"data.cache_batch_size must be at least 1, got {batch_size}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    todo = missing[accelerator.process_index :: accelerator.num_processes]
    device = accelerator.device
    pipe.vae.to(device)
    pipe.text_encoder.to(device)
    by_bucket: dict = {}
    for sample in todo:
        by_bucket.setdefault(sample.bucket, []).append(sample)
    groups = [g[i : i + batch_size] for g in by_bucket.values() for i in range(0, len(g), batch_size)]
    progress = tqdm(total=len(todo), desc="caching latents", disable=not todo or not accelerator.is_local_main_process)
    for group in groups:
        clips = [load_clip(s) for s in group]
        latents = encode_latents(pipe.vae, torch.stack(clips))
        for sample, clip, lat in zip(group, clips, latents, strict=True):
            emb = encode_prompts(pipe, [sample.prompt], text_max_length, device)[0]
            extra = condition(clip) if condition else {}
            tmp = sample.cache_file.with_suffix(f".tmp{accelerator.process_index}")
            tensors = {"latents": lat, "prompt_embeds": emb, **extra}
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
            tmp.replace(sample.cache_file)
        progress.update(len(group))
    progress.close()
    prompts = ["", *extra_prompts]
    embeds = dict(zip(prompts, encode_prompts(pipe, prompts, text_max_length, device), strict=True))
    accelerator.wait_for_everyone()
    return embeds


class CachedDataset(torch.utils.data.Dataset):
    """Cached latents, prompt embeddings and any image condition; caption dropout is decided by the sampler's
    batch plan."""

    def __init__(self, samples: list[Sample], empty_embeds: torch.Tensor, text_max_length: int):
        self.samples = samples
        self.empty = empty_embeds
        self.text_max_length = text_max_length

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, bool]) -> dict:
        index, drop_caption = item
        data = load_file(str(self.samples[index].cache_file))
        emb = self.empty if drop_caption else data["prompt_embeds"]
        padded = torch.zeros(self.text_max_length, emb.shape[-1])
        padded[: emb.shape[0]] = emb[: self.text_max_length]
        return {**data, "prompt_embeds": padded}


class BucketBatchSampler(torch.utils.data.Sampler):
    """Deterministic, resumable batches of same-bucket samples, sharded over processes.

    Epoch ``e`` is a seeded shuffle (seed, e) of the repeated dataset, grouped by bucket into
    batches, shuffled again: one global sequence of batches, whatever the number of processes. From the
    position on, the batches are dealt round-robin to the ranks (every rank gets the same number). The position
    counts the *global* batches consumed, so a run resumes exactly from ``(epoch, position)`` on the same number
    of processes, and continues the same global sequence on another number (see :meth:`set_position`). Each item
    carries its caption-dropout decision. With ``rank=None`` it yields every rank's batches in the global order
    (a multiple of ``world_size``) for accelerate's ``BatchSamplerShard`` to deal round-robin, as a prepared
    DataLoader does.
    """

    drop_last = True  # the batches are always full and a multiple of the world size: nothing to pad

    def __init__(self, samples, batch_size, seed, rank: int | None, world_size, repeat=1, caption_dropout=0.0):
        self.buckets = [s.bucket for s in samples]
        self.repeats = [s.repeat for s in samples]
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world_size
        self.repeat, self.caption_dropout = repeat, caption_dropout
        self.epoch, self.position = 0, 0

    def batches(self, epoch: int, position: int = 0) -> list[list[tuple[int, bool]]]:
        """This rank's batches (every rank's, for ``rank=None``) of ``epoch`` from global batch ``position`` on."""
        rng = random.Random(f"{self.seed}-{epoch}")
        order = [i for _ in range(self.repeat) for i, n in enumerate(self.repeats) for _ in range(n)]
        rng.shuffle(order)
        by_bucket: dict = {}
        for i in order:
            by_bucket.setdefault(self.buckets[i], []).append((i, rng.random() < self.caption_dropout))
        batches = [
            items[j : j + self.batch_size]
            for items in by_bucket.values()
            for j in range(0, len(items) - self.batch_size + 1, self.batch_size)
        ]
        rng.shuffle(batches)
        rest = batches[position:]
        usable = rest[: len(rest) // self.world * self.world]
        return usable if self.rank is None else usable[self.rank :: self.world]

    def set_position(self, epoch: int, position: int) -> None:
        """Iterate epoch ``epoch`` from its ``position``-th global batch (batches consumed by all ranks)."""
        self.epoch, self.position = epoch, position

    def __len__(self) -> int:
        return len(self.batches(self.epoch, self.position))

    def __iter__(self):
        yield from self.batches(self.epoch, self.position)
