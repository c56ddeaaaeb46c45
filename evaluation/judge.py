"""Vision-language judge for MicroWorldBench through any OpenAI-compatible chat API.

One request per (video, task, dimension), as published: 8 frames at
``floor((i + 0.5) * N / 8)``, a prompt holding the task, its requirements and the numbered
criteria, and a JSON answer ``{"scores": [0/1...], "reasons": [...], "reasoning": "..."}``.

Reliability: transport errors, 429 and 5xx are retried with exponential backoff by the
``openai`` client (``max_retries``, honouring ``Retry-After``); 413 re-sends smaller frames;
an unparsable answer or one whose number of scores differs from the number of criteria is
re-asked in the same conversation; request options the server rejects (JSON schema,
temperature, seed) are dropped once and remembered. Concurrency and requests per minute are
limited across all threads using the judge.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
from PIL import Image
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

import media.video
from media.video import DecodeError

from .microworldbench import DIMENSION_TITLES, Criterion

logger = logging.getLogger(__name__)

PROMPT_VERSION = "mwb-judge-v1"
"""Version of the prompt template; part of every cache key."""


class JudgeConfig(BaseSettings):
    """How to reach and drive the judge; every field can be set from ``MICROVERSE_JUDGE_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="MICROVERSE_JUDGE_", extra="ignore")

    base_url: str = ""
    """Base URL of the OpenAI-compatible API, e.g. ``https://api.openai.com/v1`` or ``http://host:8000/v1``."""
    api_key: str = "EMPTY"
    """API key (local vLLM servers accept any)."""
    model: str = "gpt-4o"
    """Judge model name (``gpt-5``, ``gpt-4o``, ``Qwen/Qwen2.5-VL-72B-Instruct``...)."""
    concurrency: int = Field(4, ge=1)
    """Maximum requests in flight at once."""
    rpm: float = Field(0, ge=0)
    """Maximum requests per minute (0: unlimited)."""
    timeout_s: float = Field(180.0, gt=0)
    """Timeout of one HTTP request, seconds."""
    max_retries: int = Field(5, ge=0)
    """Retries with backoff on connection errors, 429 and 5xx."""
    max_reasks: int = Field(2, ge=0)
    """Re-asks after an unparsable or wrong-length answer."""
    temperature: float = 0.0
    """Sampling temperature (dropped if the model rejects it)."""
    seed: int | None = 0
    """Sampling seed where supported (dropped if rejected); repeat r uses ``seed + r``."""
    num_frames: int = Field(8, ge=1)
    """Frames sent per request (published: 8)."""
    max_image_side: int = Field(1024, ge=64)
    """Longest side of a frame sent to the judge; halved on every HTTP 413."""
    jpeg_quality: int = Field(90, ge=10, le=100)
    """JPEG quality of the frames."""
    price_input_per_mtok: float = Field(0.0, ge=0)
    """USD per million prompt tokens, for cost accounting."""
    price_output_per_mtok: float = Field(0.0, ge=0)
    """USD per million completion tokens."""

    @classmethod
    def from_env(cls) -> JudgeConfig | None:
        """The configuration from ``MICROVERSE_JUDGE_*`` variables, or None without a base URL."""
        config = cls()
        return config if config.base_url else None


class JudgeError(RuntimeError):
    """The judge produced no valid answer after every retry and re-ask."""


class JudgeConfigError(RuntimeError):
    """The judge rejects the configuration itself (bad key, unknown model or URL): stop, do not retry."""


class VideoError(ValueError):
    """A video cannot be decoded or has no frames."""


def frame_positions(total: int, count: int = 8) -> list[int]:
    """Published sampling positions ``floor((i + 0.5) * total / count)``."""
    try:
        return media.video.frame_positions(total, count, "centres")
    except DecodeError as exc:
        raise VideoError(str(exc)) from exc


def sample_frames(video: bytes | str | Path, count: int = 8) -> list[Image.Image]:
    """Decode ``count`` frames at the published positions from an mp4 path or bytes."""
    try:
        frames = media.video.sample_frames(video, count, "centres")
    except DecodeError as exc:
        raise VideoError(str(exc)) from exc
    return [Image.fromarray(frame) for frame in frames]


def _encode_jpeg(image: Image.Image, max_side: int, quality: int) -> str:
    image = image.convert("RGB")
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return base64.b64encode(buffer.getvalue()).decode()


def build_prompt(
    task: str, requirement: str, dimension: str, criteria: Sequence[Criterion], num_frames: int = 8
) -> str:
    """The judge prompt for one dimension: task, requirements, numbered criteria, output format."""
    title = DIMENSION_TITLES[dimension]
    lines = [
        f"{i}. [{'Positive Point' if c.sign > 0 else 'Penalty Point'}] {c.text}" for i, c in enumerate(criteria, 1)
    ]
    n = len(criteria)
    return (
        "You are a professional video evaluation expert. Evaluate this microscopic-world scientific video "
        f"in the {title} dimension against the criteria below.\n\n"
        f"**Task Description:**\n{task}\n\n**Detailed Requirements:**\n{requirement}\n\n"
        f"**{title} Evaluation Criteria ({n}):**\n" + "\n".join(lines) + "\n\n"
        "**Instructions:**\n"
        f"1. The {num_frames} images are frames of the video in chronological order.\n"
        "2. Judge every criterion with 1 or 0.\n"
        "3. Positive Point: 1 if the video meets the criterion, else 0.\n"
        "4. Penalty Point: 1 if the video exhibits the described problem, else 0.\n\n"
        "**Output (JSON only):**\n"
        '{"scores": [0 or 1, ...], "reasons": ["why, for each criterion", ...], "reasoning": "overall summary"}\n'
        f'"scores" and "reasons" must each have exactly {n} elements, in criterion order.'
    )


def response_schema(n: int) -> dict[str, Any]:
    """JSON schema of an answer with ``n`` criteria (sent as ``response_format``)."""
    return {
        "type": "json_schema",
        "json_schema": {
            "name": "mwbench_judgement",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {
                    "scores": {
                        "type": "array",
                        "items": {"type": "integer", "enum": [0, 1]},
                        "minItems": n,
                        "maxItems": n,
                    },
                    "reasons": {"type": "array", "items": {"type": "string"}, "minItems": n, "maxItems": n},
                    "reasoning": {"type": "string"},
                },
                "required": ["scores", "reasons", "reasoning"],
                "additionalProperties": False,
            },
        },
    }


_FENCE_RE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def parse_answer(text: str, n: int) -> tuple[list[int], list[str], str]:
    """Parse a judge answer tolerantly (code fences, prose around the JSON, "1"/true scores).

    Raises ValueError when no usable JSON object is found or the number of scores is not ``n``.
    """
    candidates = [m.group(1) for m in _FENCE_RE.finditer(text)] + [text]
    data: Any = None
    for candidate in candidates:
        start, end = candidate.find("{"), candidate.rfind("}")
        if start == -1 or end <= start:
            continue
        try:
            data = json.loads(candidate[start : end + 1])
            break
        except json.JSONDecodeError:
            continue
    if not isinstance(data, dict) or not isinstance(data.get("scores"), list):
        raise ValueError("no JSON object with a 'scores' list")
    scores = []
    for value in data["scores"]:
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, str) and value.strip() in ("0", "1"):
            value = int(value.strip())
        if value not in (0, 1):
            raise ValueError(f"score {value!r} is not 0 or 1")
        scores.append(int(value))
    if len(scores) != n:
        raise ValueError(f"{len(scores)} scores for {n} criteria")
    reasons = data.get("reasons")
    reasons = [str(r) for r in reasons] if isinstance(reasons, list) and len(reasons) == n else [""] * n
    return scores, reasons, str(data.get("reasoning", ""))


@dataclass(frozen=True)
class Judgement:
    """The judge's verdict on one dimension of one video."""

    scores: list[int]
    """0/1 per criterion."""
    reasons: list[str]
    """Reason per criterion (empty strings when the model gave none)."""
    reasoning: str
    """Overall reasoning."""
    raw_response: str
    """The accepted answer text."""
    prompt_tokens: int
    """Prompt tokens over every request made for this judgement."""
    completion_tokens: int
    """Completion tokens over every request."""
    cost_usd: float
    """Cost of those tokens."""
    requests: int
    """HTTP requests answered (re-asks included)."""


class _RateLimiter:
    """Spaces request starts so that at most ``rpm`` start per minute."""

    def __init__(self, rpm: float) -> None:
        self._interval = 60.0 / rpm if rpm > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if not self._interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self._interval
        time.sleep(max(0.0, start - now))


@dataclass
class Usage:
    """Running totals of what the judge spent."""

    requests: int = 0
    """Answered HTTP requests."""
    prompt_tokens: int = 0
    """Prompt tokens."""
    completion_tokens: int = 0
    """Completion tokens."""
    cost_usd: float = 0.0
    """Cost in USD."""


class VLMJudge:
    """Judges video frames against rubric criteria through an OpenAI-compatible chat API."""

    def __init__(self, config: JudgeConfig, client: openai.OpenAI | None = None) -> None:
        if not config.base_url:
            raise ValueError("JudgeConfig.base_url is required (or set MICROVERSE_JUDGE_BASE_URL)")
        self.config = config
        self.client = client or openai.OpenAI(
            base_url=config.base_url, api_key=config.api_key, timeout=config.timeout_s, max_retries=config.max_retries
        )
        self.usage = Usage()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(config.concurrency)
        self._limiter = _RateLimiter(config.rpm)
        self._unsupported: set[str] = set()

    def _cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        c = self.config
        return (prompt_tokens * c.price_input_per_mtok + completion_tokens * c.price_output_per_mtok) / 1e6

    def _complete(self, messages: list[dict[str, Any]], n: int, seed: int | None) -> Any:
        """One chat completion, dropping request options the server rejects."""
        while True:
            params: dict[str, Any] = {
                "response_format": response_schema(n),
                "temperature": self.config.temperature,
                "seed": seed,
            }
            params = {k: v for k, v in params.items() if k not in self._unsupported and v is not None}
            self._limiter.acquire()
            try:
                with self._slots:
                    return self.client.chat.completions.create(model=self.config.model, messages=messages, **params)
            except openai.BadRequestError as exc:
                text = str(exc).lower()
                rejected = [p for p in params if p in text or (p == "response_format" and "json_schema" in text)]
                if not rejected:
                    raise
                logger.warning("judge server rejected %s; retrying without", rejected)
                self._unsupported.update(rejected)

    def judge(
        self,
        frames: Sequence[Image.Image],
        task: str,
        requirement: str,
        dimension: str,
        criteria: Sequence[Criterion],
        repeat: int = 0,
    ) -> Judgement:
        """Judge one dimension; ``repeat`` > 0 asks again with seed ``seed + repeat`` (agreement runs)."""
        n = len(criteria)
        prompt = build_prompt(task, requirement, dimension, criteria, len(frames))
        seed = None if self.config.seed is None else self.config.seed + repeat
        max_side = min(self.config.max_image_side, max(max(f.size) for f in frames))
        followups: list[dict[str, Any]] = []
        totals = [0, 0, 0]  # prompt tokens, completion tokens, requests
        attempts = 0
        last_error = "no answer"
        while attempts <= self.config.max_reasks:
            images = [
                {
                    "type": "image_url",
                    "image_url": {
                        "url": "data:image/jpeg;base64," + _encode_jpeg(f, max_side, self.config.jpeg_quality)
                    },
                }
                for f in frames
            ]
            messages = [{"role": "user", "content": [{"type": "text", "text": prompt}, *images]}, *followups]
            try:
                response = self._complete(messages, n, seed)
            except openai.APIStatusError as exc:
                if exc.status_code == 413 and max_side > 64:
                    max_side //= 2
                    logger.warning("judge payload too large (413); frames down to %d px", max_side)
                    continue
                if exc.status_code in (401, 403, 404):
                    raise JudgeConfigError(
                        f"judge at {self.config.base_url} refused model {self.config.model!r}: {exc}"
                    ) from exc
                raise JudgeError(f"judge request failed: {exc}") from exc
            except openai.APIConnectionError as exc:
                raise JudgeError(f"judge unreachable: {exc}") from exc
            attempts += 1
            usage = response.usage
            pt, ct = (usage.prompt_tokens or 0, usage.completion_tokens or 0) if usage else (0, 0)
            totals[0] += pt
            totals[1] += ct
            totals[2] += 1
            with self._lock:
                self.usage.requests += 1
                self.usage.prompt_tokens += pt
                self.usage.completion_tokens += ct
                self.usage.cost_usd += self._cost(pt, ct)
            text = (response.choices[0].message.content or "") if response.choices else ""
            try:
                scores, reasons, reasoning = parse_answer(text, n)
            except ValueError as exc:
                last_error = str(exc)
                logger.info("re-asking judge (%s, %s): %s", dimension, self.config.model, exc)
                followups = [
                    {"role": "assistant", "content": text},
                    {
                        "role": "user",
                        "content": f"Your answer was not usable ({exc}). Reply with the JSON object only, with "
                        f"exactly {n} scores (0 or 1) and {n} reasons, one per criterion in order.",
                    },
                ]
                continue
            return Judgement(
                scores, reasons, reasoning, text, totals[0], totals[1], self._cost(totals[0], totals[1]), totals[2]
            )
        raise JudgeError(f"no valid answer after {attempts} request(s): {last_error}")
