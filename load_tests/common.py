"""What the Locust scenarios and the runner's capacity probe both send, and how they talk to each other."""

from __future__ import annotations

import random

PACING_ENV = "LOAD_TEST_PACING_S"
"""Seconds between the starts of one user's iterations (``constant_pacing``)."""
JOBS_FILE_ENV = "LOAD_TEST_JOBS_FILE"
"""File the scenarios append every created ``/v1/videos`` job id to, one per line."""
API_KEY_ENV = "LOAD_TEST_API_KEY"
"""Sent as ``Authorization: Bearer`` when set."""
HOSTS_ENV = "LOAD_TEST_HOSTS"
"""Comma-separated replica URLs: each user talks to one, in turn (what a round-robin load balancer does)."""

PROMPTS = (
    "a paramecium swims through pond water, microscope view",
    "a cell divides into two daughter cells",
    "bacteria cluster into a biofilm on glass",
    "a diatom rotates slowly in bright field",
    "red blood cells flow through a capillary",
)


def video_request(rng: random.Random | None = None) -> dict:
    """A small generation request: 64x64, 9 or 17 frames, 2-4 steps, random prompt and seed."""
    rng = rng or random
    return {"prompt": rng.choice(PROMPTS), "width": 64, "height": 64, "num_frames": rng.choice((9, 17)),
            "num_inference_steps": rng.choice((2, 3, 4)), "seed": rng.randrange(2**31)}


def job_request(rng: random.Random | None = None) -> dict:
    """The same request in ``POST /v1/videos`` form (OpenAI ``size`` plus MicroVerse extras)."""
    r = video_request(rng)
    return {"prompt": r["prompt"], "size": f"{r['width']}x{r['height']}", "num_frames": r["num_frames"],
            "num_inference_steps": r["num_inference_steps"], "seed": r["seed"]}
