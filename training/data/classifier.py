"""On-topic video classifier: ``transformers.VideoMAEForVideoClassification`` fine-tuned on a small
labelled folder (``<root>/<label>/*.mp4``), evaluated on a held-out split (precision and recall of
the positive label), then applied to clips with a threshold.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from media.video import sample_frames

logger = logging.getLogger(__name__)


@dataclass
class ClassifierConfig:
    """Fine-tuning settings."""

    positive: str = "keep"
    """Label (sub-folder name) of wanted clips; its probability is the clip score."""
    base: str | None = None
    """Pretrained VideoMAE (HF id or folder, e.g. ``MCG-NJU/videomae-base``); None builds a tiny random one."""
    num_frames: int = 16
    """Frames sampled uniformly per clip (must match a pretrained model's ``num_frames``)."""
    image_size: int = 224
    """Frame size for a tiny model (a pretrained model's processor decides otherwise)."""
    hidden_size: int = 64
    """Width of a tiny model."""
    layers: int = 2
    """Depth of a tiny model."""
    epochs: int = 20
    """Passes over the training split."""
    batch_size: int = 8
    """Clips per step."""
    lr: float = 1e-3
    """AdamW learning rate (use ~5e-5 for a pretrained model)."""
    holdout: float = 0.25
    """Fraction of each label held out for precision/recall."""
    seed: int = 0
    """Seed of the split, init and shuffling."""


def _labelled(root: Path) -> dict[str, list[Path]]:
    suffixes = {".mp4", ".mov", ".mkv", ".avi", ".webm"}
    folders = [d for d in sorted(root.iterdir()) if d.is_dir()]
    labels = {d.name: sorted(p for p in d.iterdir() if p.suffix.lower() in suffixes) for d in folders}
    if len(labels) < 2:
        raise ValueError(f"{root} needs one sub-folder per label (at least two)")
    return labels


class VideoClassifier:
    """A VideoMAE classifier with its processor and positive label."""

    def __init__(self, model, processor, positive: str):
        self.model, self.processor, self.positive = model.eval(), processor, positive
        self.num_frames = model.config.num_frames

    @classmethod
    def load(cls, path: str | Path) -> VideoClassifier:
        """Load a classifier saved by :func:`train_classifier`."""
        from transformers import VideoMAEForVideoClassification, VideoMAEImageProcessor

        info = json.loads((Path(path) / "microverse_classifier.json").read_text())
        model = VideoMAEForVideoClassification.from_pretrained(path)
        return cls(model, VideoMAEImageProcessor.from_pretrained(path), info["positive"])

    def pixel_values(self, paths: list[Path]) -> torch.Tensor:
        videos = [list(sample_frames(p, self.num_frames)) for p in paths]
        return self.processor(videos, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def score(self, paths: list[Path]) -> list[float]:
        """Probability of the positive label for each clip."""
        logits = self.model(pixel_values=self.pixel_values(paths)).logits
        return logits.softmax(-1)[:, self.model.config.label2id[self.positive]].tolist()


def _build(cfg: ClassifierConfig, labels: list[str]):
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification, VideoMAEImageProcessor

    id2label = dict(enumerate(labels))
    label2id = {v: k for k, v in id2label.items()}
    if cfg.base is not None:
        model = VideoMAEForVideoClassification.from_pretrained(
            cfg.base, num_labels=len(labels), id2label=id2label, label2id=label2id, ignore_mismatched_sizes=True
        )
        return model, VideoMAEImageProcessor.from_pretrained(cfg.base)
    torch.manual_seed(cfg.seed)
    config = VideoMAEConfig(
        image_size=cfg.image_size, patch_size=max(4, cfg.image_size // 8), num_frames=cfg.num_frames, tubelet_size=2,
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers, num_attention_heads=max(1, cfg.hidden_size // 32),
        intermediate_size=cfg.hidden_size * 2, num_labels=len(labels), id2label=id2label, label2id=label2id,
    )  # fmt: skip
    size = {"shortest_edge": cfg.image_size}
    crop = {"height": cfg.image_size, "width": cfg.image_size}
    return VideoMAEForVideoClassification(config), VideoMAEImageProcessor(size=size, crop_size=crop)


def precision_recall(truth: list[bool], predicted: list[bool]) -> dict[str, float]:
    """Precision, recall and accuracy of the positive class."""
    tp = sum(t and p for t, p in zip(truth, predicted, strict=True))
    fp = sum(p and not t for t, p in zip(truth, predicted, strict=True))
    fn = sum(t and not p for t, p in zip(truth, predicted, strict=True))
    return {
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "accuracy": sum(t == p for t, p in zip(truth, predicted, strict=True)) / max(1, len(truth)),
    }


def train_classifier(data_dir: str | Path, out_dir: str | Path, cfg: ClassifierConfig, threshold: float = 0.5) -> dict:
    """Fine-tune on ``data_dir/<label>/*``, report held-out precision/recall at ``threshold``, save
    the model, processor and ``metrics.json`` to ``out_dir``; returns the metrics."""
    files = _labelled(Path(data_dir))
    if cfg.positive not in files:
        raise ValueError(f"positive label {cfg.positive!r} is not a sub-folder of {data_dir}")
    labels = list(files)
    rng = random.Random(cfg.seed)
    train, test = [], []
    for label, paths in files.items():
        paths = paths[:]
        rng.shuffle(paths)
        n_test = max(1, round(len(paths) * cfg.holdout))
        test += [(p, labels.index(label)) for p in paths[:n_test]]
        train += [(p, labels.index(label)) for p in paths[n_test:]]
    model, processor = _build(cfg, labels)
    clf = VideoClassifier(model, processor, cfg.positive)
    cache = {p: clf.pixel_values([p])[0] for p, _ in tqdm(train + test, desc="decoding")}
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    model.train()
    for _ in tqdm(range(cfg.epochs), desc="classifier epochs"):
        rng.shuffle(train)
        for i in range(0, len(train), cfg.batch_size):
            batch = train[i : i + cfg.batch_size]
            pixels = torch.stack([cache[p] for p, _ in batch])
            out = model(pixel_values=pixels, labels=torch.tensor([y for _, y in batch]))
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    pos = labels.index(cfg.positive)
    with torch.no_grad():
        probs = model(pixel_values=torch.stack([cache[p] for p, _ in test])).logits.softmax(-1)[:, pos].tolist()
    metrics = {
        **precision_recall([y == pos for _, y in test], [p >= threshold for p in probs]),
        "threshold": threshold, "n_train": len(train), "n_test": len(test), "labels": labels, "positive": cfg.positive,
    }  # fmt: skip
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    info = {"positive": cfg.positive, "config": asdict(cfg)}
    (out_dir / "microverse_classifier.json").write_text(json.dumps(info, indent=1))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    logger.info("classifier: precision %.3f recall %.3f on %d held-out clips",
                metrics["precision"], metrics["recall"], len(test))
    return metrics
