"""Context parallelism of the Wan transformer across the GPUs of one machine.

Every rank holds the whole pipeline; diffusers' context parallelism (``ContextParallelConfig``,
``transformer.enable_parallelism``) splits the video tokens between ranks and exchanges them inside
attention (Ulysses all-to-all over heads, ring for what the head count cannot divide). Rank 0
serves; the other ranks follow: :class:`ParallelEngine` broadcasts each batch's specs, every rank
runs the same pipeline call (same seeds, so the same noise), and a per-step broadcast of rank 0's
cancel flag keeps the collectives in step when a batch is cancelled.

Launch: under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` set) call
:func:`from_torchrun` on every rank; in a BentoML worker, which is one process, :func:`launch`
spawns ranks 1..N-1 itself and returns rank 0's engine. NCCL on CUDA, gloo on CPU (tests).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from .config import Settings
from .engine import BatchResult, DiffusersEngine, StepCallback
from .schemas import GenerationSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelLayout:
    """How the ranks split attention."""

    world_size: int
    """Ranks (GPUs) in the group."""
    ulysses_degree: int
    """Ranks exchanging heads by all-to-all; divides the head count."""
    ring_degree: int
    """Ranks passing key/value blocks around a ring; ``world_size / ulysses_degree``."""


def layout_for(world_size: int, num_heads: int) -> ParallelLayout:
    """Largest Ulysses degree dividing both ``world_size`` and ``num_heads`` (Wan2.1-1.3B: 12 heads); ring for
    the rest."""
    ulysses = max(d for d in range(1, world_size + 1) if world_size % d == 0 and num_heads % d == 0)
    return ParallelLayout(world_size, ulysses, world_size // ulysses)


def init_process_group(rank: int, world_size: int, device: str) -> torch.device:
    """Join the ``env://`` group (NCCL on CUDA, gloo on CPU) and return this rank's device."""
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local_rank)
        backend, dev = "nccl", torch.device("cuda", local_rank)
    else:
        # diffusers places rank r on accelerator r % device_count(); a CPU build reports 0 devices.
        if torch.accelerator.device_count() == 0:
            torch.accelerator.device_count = lambda: 1
        backend, dev = "gloo", torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return dev


def enable_context_parallel(transformer, world_size: int) -> ParallelLayout:
    """Split ``transformer``'s sequence over the group's ``world_size`` ranks."""
    from diffusers import ContextParallelConfig

    layout = layout_for(world_size, transformer.config.num_attention_heads)
    transformer.enable_parallelism(config=ContextParallelConfig(
        ulysses_degree=layout.ulysses_degree if layout.ulysses_degree > 1 else None,
        ring_degree=layout.ring_degree if layout.ring_degree > 1 else None))
    logger.info("context parallel: %s", layout)
    return layout


def _agree(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank."""
    t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, src=0)
    return bool(t.item())


class ParallelEngine:
    """Rank 0's engine: runs each batch on every rank of the group (the ``VideoEngine`` interface)."""

    def __init__(self, engine: DiffusersEngine, layout: ParallelLayout, processes=None):
        self.engine = engine
        self.layout = layout
        self._processes = processes

    @property
    def model(self):
        return self.engine.model

    @property
    def choice(self):
        return self.engine.choice

    def generate(self, specs: list[GenerationSpec], on_step: StepCallback | None = None,
                 should_cancel: Callable[[], bool] | None = None) -> BatchResult:
        dist.broadcast_object_list([specs], src=0)
        return self.engine.generate(specs, on_step, lambda: _agree(bool(should_cancel and should_cancel())))

    def close(self) -> None:
        """Stop the followers and leave the group."""
        dist.broadcast_object_list([None], src=0)
        if self._processes is not None:
            self._processes.join()
        dist.destroy_process_group()


def follow(engine: DiffusersEngine) -> None:
    """Ranks > 0: run every batch rank 0 broadcasts until it sends ``None``."""
    from .engine import GenerationCancelled

    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            break
        with contextlib.suppress(GenerationCancelled):
            engine.generate(box[0], should_cancel=lambda: _agree(False))
    dist.destroy_process_group()


def _build(settings: Settings, rank: int, world_size: int) -> tuple[DiffusersEngine, ParallelLayout]:
    from .optimize import resolve_device

    device = resolve_device(settings.device)
    init_process_group(rank, world_size, device)
    engine = DiffusersEngine.from_settings(settings)
    layout = enable_context_parallel(engine.model.pipe.transformer, world_size)
    if engine.options.fast_cache_threshold > 0:
        # Each rank would judge the first block's change on its own shard and could skip blocks (and
        # their collectives) while another rank runs them: a hang. The other fast levers stay.
        logger.warning("context parallel: the fast preset's first-block step cache is off")
        engine.options = replace(engine.options, fast_cache_threshold=0.0)
    return engine, layout


def _follower(rank: int, settings: Settings, world_size: int, env: dict[str, str]) -> None:
    os.environ.update(env, RANK=str(rank + 1), LOCAL_RANK=str(rank + 1))
    engine, _ = _build(settings, rank + 1, world_size)
    follow(engine)


def from_torchrun(settings: Settings) -> ParallelEngine | None:
    """Under ``torchrun``: rank 0 gets its :class:`ParallelEngine`; other ranks follow and return None."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    engine, layout = _build(settings, rank, world_size)
    if rank == 0:
        return ParallelEngine(engine, layout)
    follow(engine)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(settings: Settings, world_size: int) -> ParallelEngine:
    """From one process (a BentoML worker): spawn ranks 1..N-1 and return rank 0's engine."""
    import torch.multiprocessing as mp

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world_size)}
    os.environ.update(env, RANK="0", LOCAL_RANK="0")
    processes = mp.start_processes(_follower, args=(settings, world_size, env), nprocs=world_size - 1, join=False,
                                   start_method="spawn")
    engine, layout = _build(settings, 0, world_size)
    return ParallelEngine(engine, layout, processes)


def visible_gpus() -> int:
    """CUDA devices this process can use (context parallelism applies when more than one)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
