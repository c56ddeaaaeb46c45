"""Physics-grounded video metrics: how well videos show what the micro-world simulator controls.

``cases`` holds the per-process checks, the held-out cases and their evaluation over a
``generate(prompt, seed) -> frames`` callable; ``sources`` the video sources (simulator ceiling, VAE
reconstruction, a folder of clips; checkpoints through a :class:`ModelRunner` handed in from above);
``report`` the Markdown/JSON report and plots; ``cli`` the ``microverse eval physics`` command. The
pixel analysers themselves live in :mod:`simulator.analysis`.
"""

from .cases import (
    ACCEPTANCE_PROMPTS,
    ACCEPTANCE_REQUIRED,
    HELDOUT_SEED,
    CaseResult,
    Generate,
    PhysicsCase,
    PhysicsReport,
    Tolerances,
    acceptance_checks,
    check_process,
    evaluate_physics,
    heldout_cases,
)
from .cli import physics_command
from .report import write_report
from .sources import (
    ModelGenerate,
    ModelRunner,
    folder_cases,
    load_vae,
    simulator_generate,
    simulator_prompt_generate,
    through_vae,
)

__all__ = [
    "ACCEPTANCE_PROMPTS",
    "ACCEPTANCE_REQUIRED",
    "HELDOUT_SEED",
    "CaseResult",
    "Generate",
    "ModelGenerate",
    "ModelRunner",
    "PhysicsCase",
    "PhysicsReport",
    "Tolerances",
    "acceptance_checks",
    "check_process",
    "evaluate_physics",
    "folder_cases",
    "heldout_cases",
    "load_vae",
    "physics_command",
    "simulator_generate",
    "simulator_prompt_generate",
    "through_vae",
    "write_report",
]
