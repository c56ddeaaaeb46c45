"""The Wan flow-matching objective: shifted timestep sampling, noising, target and loss weights.

Upstream (DiffSynth's ``FlowMatchSFTLoss``, which the MicroVerse trainer uses) draws a timestep id
uniformly from 1000 training timesteps whose sigmas are ``linspace(1, 0, 1001)[:-1]`` shifted by
``shift * s / (1 + (shift - 1) * s)`` (shift 5), noises ``x_t = (1 - s) x0 + s e``, regresses
``e - x0`` with MSE, and weights each sample by a bell curve over the timestep,
``exp(-2 (t / 1000 - 0.5) ** 2)`` minus its minimum over the schedule, normalised to mean 1.
"""

from __future__ import annotations

import logging

import torch

from training.config import ObjectiveConfig

logger = logging.getLogger(__name__)

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan/SD3 timestep shift."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class FlowMatchObjective:
    """Samples sigmas and computes the weighted flow-matching loss for a batch."""

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg
        self.schedule = shift_sigmas(torch.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1)[:-1], cfg.flow_shift)
        lo, hi = cfg.timestep_range
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"objective.timestep_range must satisfy 0 <= low < high <= 1, got {cfg.timestep_range}")
        self._in_range = self.schedule[(self.schedule >= lo) & (self.schedule <= hi)]
        if len(self._in_range) == 0:
            raise ValueError(f"objective.timestep_range {cfg.timestep_range} holds none of the training sigmas")
        bell = self._bell(self.schedule)
        self._bell_min, self._bell_norm = bell.min(), (bell - bell.min()).mean()

    @staticmethod
    def _bell(sigmas: torch.Tensor) -> torch.Tensor:
        return torch.exp(-2 * (sigmas - 0.5) ** 2)

    def sample_sigmas(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Per-sample sigmas in (0, 1] (timestep = 1000 sigma) within ``timestep_range``."""
        lo, hi = self.cfg.timestep_range
        if self.cfg.timestep_sampling == "uniform":
            return self._in_range[torch.randint(0, len(self._in_range), (batch,), generator=generator)]
        if self.cfg.timestep_sampling == "logit_normal":
            u = torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * torch.randn(batch, generator=generator))
            sigmas = shift_sigmas(u, self.cfg.flow_shift)
            return sigmas if (lo, hi) == (0.0, 1.0) else lo + (hi - lo) * sigmas
        raise ValueError(f"unknown timestep_sampling {self.cfg.timestep_sampling!r}")

    def weights(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights (mean 1 over the training schedule for ``bell``)."""
        if self.cfg.weighting == "none":
            return torch.ones_like(sigmas)
        if self.cfg.weighting == "bell":
            return (self._bell(sigmas) - self._bell_min) / self._bell_norm
        raise ValueError(f"unknown loss_weighting {self.cfg.loss_weighting!r}")

    @staticmethod
    def noisy_input(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """``x_t = (1 - s) x0 + s e`` with one sigma per sample."""
        s = sigmas.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        return (1 - s) * x0 + s * noise

    def loss(
        self, pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, mask=None
    ) -> torch.Tensor:
        """Weighted MSE between the prediction and ``e - x0``, in fp32, over the elements ``mask`` keeps (all when
        None; TI2V leaves out its clean first frame)."""
        per_sample = masked_mse(pred, noise - x0, mask)
        return (per_sample * self.weights(sigmas).to(per_sample.device)).mean()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample MSE in fp32 over the elements where the broadcastable ``mask`` is 1 (all when None)."""
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        return err.flatten(1).mean(1)
    mask = mask.to(err).expand_as(err)
    return (err * mask).flatten(1).sum(1) / mask.flatten(1).sum(1)
