"""Context parallelism of the Wan transformer across the GPUs of one machine.

Every rank holds the whole pipeline; diffusers' context parallelism (``ContextParallelConfig``,
``transformer.enable_parallelism``) splits the video tokens between ranks and exchanges them inside
attention (Ulysses all-to-all over heads, ring for what the head count cannot divide). Rank 0
serves; the other ranks follow: :class:`ParallelEngine` broadcasts each batch's specs, every rank
runs the same pipeline call (same seeds, so the same noise), and a per-step broadcast of rank 0's
cancel flag keeps the collectives in step when a batch is cancelled.

Nothing here splits a tensor itself: sharding the sequence at the transformer's entry, the all-to-all
and ring exchanges inside attention and the gather of its output are diffusers' (the Wan transformer's
``_cp_plan``). What is ours is what diffusers leaves to its caller: one rank serving while the others
follow, the choice of Ulysses and ring degrees, and turning off the one lever it cannot keep in step
(the fast preset's step cache, see :func:`_build`).

Launch: ``MICROVERSE_CONTEXT_PARALLEL=N`` makes :func:`build_engine` (what the service, ``microverse
generate`` and ``microverse info`` build) call :func:`launch`, which spawns ranks 1..N-1 from the one
serving process (a BentoML worker is one process) and returns rank 0's engine; closing it stops them.
Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` set) call
:func:`from_torchrun` on every rank instead. NCCL on CUDA, gloo on CPU (tests).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from .config import Settings
from .engine import BatchResult, DiffusersEngine, GenerationCancelled, StepCallback, VideoEngine
from .families import experts
from .optimize import ATTENTION_BACKENDS, ConfigError, resolve_device
from .schemas import GenerationSpec

logger = logging.getLogger(__name__)

CP_ATTENTION = ("native", "cudnn", "flash", "sage")
"""Our attention backends that diffusers can run context-parallel (its ``supports_context_parallel``);
FlashAttention-3 and xformers have no ring or Ulysses path there."""


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


def _cp_attention(engine: DiffusersEngine) -> None:
    """``auto`` may pick FlashAttention-3, which diffusers cannot split: use PyTorch SDPA instead."""
    choice = engine.choice
    if choice.attention_backend in CP_ATTENTION:
        return
    for transformer in experts(engine.model.pipe):
        transformer.set_attention_backend(ATTENTION_BACKENDS["native"])
    logger.info("context parallel: attention %s -> native (diffusers has no context-parallel %s)",
                choice.attention_backend, choice.attention_backend)
    choice.attention_backend, choice.attention_reason = "native", "context parallel: PyTorch SDPA (ring/Ulysses)"


def _agree(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank."""
    t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, src=0)
    return bool(t.item())


class ParallelEngine:
    """Rank 0's engine: runs each batch on every rank of the group (the ``VideoEngine`` interface).

    The ranks stay in step only while every batch ends the same way on all of them (finished, or cancelled at
    the same step by :func:`_agree`); after any other end (an error, Ctrl-C) the group is out of step: further
    batches are refused and :meth:`close` kills the followers instead of asking them to stop.
    """

    def __init__(self, engine: DiffusersEngine, layout: ParallelLayout, processes: list | None = None):
        self.engine = engine
        self.layout = layout
        self.processes = processes or []
        """The spawned ranks 1..N-1 (multiprocessing processes); empty under ``torchrun``."""
        self._lock = threading.Lock()
        self._in_step = True
        self._closed = False

    @property
    def model(self):
        return self.engine.model

    @property
    def choice(self):
        return self.engine.choice

    def generate(self, specs: list[GenerationSpec], on_step: StepCallback | None = None,
                 should_cancel: Callable[[], bool] | None = None) -> BatchResult:
        with self._lock:
            if self._closed or not self._in_step:
                raise RuntimeError("the context-parallel ranks are stopped or out of step after a failed batch; "
                                   "restart the service")
            self._in_step = False
            dist.broadcast_object_list([specs], src=0)
            try:
                result = self.engine.generate(specs, on_step, lambda: _agree(bool(should_cancel and should_cancel())))
            except GenerationCancelled:
                self._in_step = True
                raise
            self._in_step = True
            return result

    def close(self, timeout: float = 30.0) -> None:
        """Stop the followers (killed when out of step, or still running ``timeout`` s after being asked to stop)
        and leave the group; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        idle = self._lock.acquire(timeout=timeout)
        if idle and self._in_step:
            dist.broadcast_object_list([None], src=0)
        _stop(self.processes, timeout if idle and self._in_step else 0.0)
        dist.destroy_process_group()
        if idle:
            self._lock.release()  # a batch that comes later finds the group closed
        logger.info("context parallel: the %d other rank(s) stopped", len(self.processes))


def _stop(processes: list, timeout: float) -> None:
    """Wait up to ``timeout`` s for ``processes`` (multiprocessing) to end, then kill those still running."""
    deadline = time.monotonic() + timeout
    for proc in processes:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in processes:
        if proc.is_alive():
            logger.warning("context parallel: rank process %d did not stop; killing it", proc.pid)
            proc.kill()
            proc.join()


def follow(engine: DiffusersEngine) -> None:
    """Ranks > 0: run every batch rank 0 broadcasts until it sends ``None``."""
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            break
        with contextlib.suppress(GenerationCancelled):
            engine.generate(box[0], should_cancel=lambda: _agree(False))
    dist.destroy_process_group()


def _build(settings: Settings, rank: int, world_size: int) -> tuple[DiffusersEngine, ParallelLayout]:
    device = resolve_device(settings.device)
    init_process_group(rank, world_size, device)
    engine = DiffusersEngine.from_settings(settings)
    _cp_attention(engine)
    for transformer in experts(engine.model.pipe):  # Wan2.2 A14B: both experts
        layout = enable_context_parallel(transformer, world_size)
    if engine.options.fast_cache_threshold > 0:
        # Each rank would judge the first block's change on its own shard and could skip blocks (and
        # their collectives) while another rank runs them: a hang. The other fast levers stay.
        logger.warning("context parallel: the fast preset's first-block step cache is off")
        engine.options = replace(engine.options, fast_cache_threshold=0.0)
    return engine, layout


def _exit_with(parent_pid: int, interval: float = 0.5) -> None:
    """End this process once ``parent_pid`` is no longer its parent (rank 0 died without stopping it)."""
    while os.getppid() == parent_pid:
        time.sleep(interval)
    logger.warning("context parallel: rank 0 (pid %d) is gone; this rank exits", parent_pid)
    os._exit(1)


def _follower(index: int, settings: Settings, world_size: int, env: dict[str, str], parent_pid: int) -> None:
    """Rank ``index + 1``, spawned by :func:`launch`: it ends when rank 0 stops it or dies, not on a signal sent
    to its process group (Ctrl-C, the server's stop), so rank 0 decides when the group ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent_pid,), name="rank0-watch", daemon=True).start()
    os.environ.update(env, RANK=str(index + 1), LOCAL_RANK=str(index + 1))
    engine, _ = _build(settings, index + 1, world_size)
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
    context = mp.start_processes(_follower, args=(settings, world_size, env, os.getpid()), nprocs=world_size - 1,
                                 join=False, start_method="spawn")
    try:
        engine, layout = _build(settings, 0, world_size)
    except BaseException:
        _stop(context.processes, 0.0)
        raise
    return ParallelEngine(engine, layout, context.processes)


def visible_gpus() -> int:
    """CUDA devices this process can use (context parallelism applies when more than one)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_settings(settings: Settings, device: str) -> None:
    """Refuse, naming the settings, a ``context_parallel`` this machine or the other settings cannot run."""
    n = settings.context_parallel
    if device == "cuda" and n > visible_gpus():
        raise ConfigError(f"MICROVERSE_CONTEXT_PARALLEL={n} needs {n} GPUs; this process sees {visible_gpus()} "
                          "(CUDA_VISIBLE_DEVICES)")
    if device == "cuda" and settings.offload != "none":
        raise ConfigError(f"MICROVERSE_CONTEXT_PARALLEL={n} cannot run with MICROVERSE_OFFLOAD={settings.offload}: "
                          "every rank keeps its whole pipeline on its own GPU")
    if settings.attention_backend not in ("auto", *CP_ATTENTION):
        raise ConfigError(f"MICROVERSE_CONTEXT_PARALLEL={n} cannot run with MICROVERSE_ATTENTION_BACKEND="
                          f"{settings.attention_backend}: diffusers splits attention only with "
                          f"{', '.join(CP_ATTENTION)}")


def build_engine(settings: Settings) -> VideoEngine:
    """The engine the settings ask for: one process, or ``context_parallel`` ranks (:func:`launch`; close it with
    its ``close()`` to stop them)."""
    if settings.context_parallel == 1:
        return DiffusersEngine.from_settings(settings)
    check_settings(settings, resolve_device(settings.device))
    logger.info("context parallel: spawning %d ranks", settings.context_parallel)
    return launch(settings, settings.context_parallel)


@contextlib.contextmanager
def engine_for(settings: Settings) -> Iterator[VideoEngine]:
    """:func:`build_engine` for one command: the context-parallel ranks stop when the block ends, however it ends."""
    engine = build_engine(settings)
    try:
        yield engine
    finally:
        if isinstance(engine, ParallelEngine):
            engine.close()
