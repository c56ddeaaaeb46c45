"""Vision-language judge for MicroWorldBench through any OpenAI-compatible chat API.

One request per (video, task, dimension). What is sent and how the answer is read is a
:class:`JudgeProtocol`: ``ours`` (the default) or ``upstream`` (the published evaluator's
request, reproduced exactly); see the README's "Judge protocols". Both send 8 frames at
``floor((i + 0.5) * N / 8)``.

Reliability, the same under every protocol: transport errors, 429 and 5xx are retried with
exponential backoff by the ``openai`` client (``max_retries``, honouring ``Retry-After``); 413
re-sends smaller frames as the protocol says; under ``ours`` an unparsable answer or one whose
number of scores differs from the number of criteria is re-asked in the same conversation, and
request options the server rejects (JSON schema, temperature, seed) are dropped once and
remembered. Concurrency and requests per minute are limited across all threads using the judge.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
from PIL import Image
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

import media.video
from media.video import DecodeError

from .microworldbench import DIMENSION_TITLES, Criterion

logger = logging.getLogger(__name__)

PromptBuilder = Callable[[str, str, str, Sequence[Criterion], int], str]
"""``(task, requirement, dimension, criteria, num_frames) -> prompt``."""


@dataclass(frozen=True)
class JudgeProtocol:
    """What the judge is sent and how its answer is read: prompt, sampling, frames, parsing.

    Transport (retries with backoff, rate and concurrency limits, cost accounting) is the same
    under every protocol. Instances: :data:`OURS` and :data:`UPSTREAM`, by name in :data:`PROTOCOLS`.
    """

    name: str
    """Name chosen with ``--judge-protocol`` or ``MICROVERSE_JUDGE_PROTOCOL``."""
    version: str
    """Names the protocol and its revision, unique across protocols: the protocol's part of every judgement's
    cache key, so a changed protocol is judged afresh (``ours`` keeps ``mwb-judge-v1``, the prompt version
    of caches written before protocols existed)."""
    prompt: PromptBuilder
    """Builds the prompt text of one dimension."""
    temperature: float | None
    """Sampling temperature sent (None: not sent, the server's default)."""
    seed: int | None
    """Sampling seed sent; repeat ``r`` of an agreement run sends ``seed + r`` (None: not sent)."""
    json_schema: bool
    """Send a strict JSON schema (:func:`response_schema`) as ``response_format``."""
    num_frames: int
    """Frames per request, at positions ``floor((i + 0.5) * N / num_frames)``."""
    max_image_side: int | None
    """Frames with a longer side are downscaled to it (None: native resolution)."""
    jpeg_quality: int
    """JPEG quality of the frames of the first request."""
    qualities_on_413: tuple[int, ...]
    """After each HTTP 413 the first request's JPEGs are re-encoded at the next of these qualities; empty:
    the longest side is halved instead (down to 64 px)."""
    strict: bool
    """True: an answer needs exactly one 0/1 score per criterion (:func:`parse_answer`), else it is re-asked
    (``max_reasks``). False: the JSON object from the first ``{`` to the last ``}`` is taken as it is
    (:func:`parse_upstream_answer`), never re-asked."""


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
    """Re-asks after an unparsable or wrong-length answer (protocols with strict answers)."""
    protocol: str = "ours"
    """Judge protocol (:data:`PROTOCOLS`): ``ours``, or ``upstream`` to reproduce the published evaluator."""
    price_input_per_mtok: float = Field(0.0, ge=0)
    """USD per million prompt tokens, for cost accounting."""
    price_output_per_mtok: float = Field(0.0, ge=0)
    """USD per million completion tokens."""

    @field_validator("protocol")
    @classmethod
    def _known_protocol(cls, value: str) -> str:
        if value not in PROTOCOLS:
            raise ValueError(f"unknown judge protocol {value!r}; choose from {', '.join(PROTOCOLS)}")
        return value

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


def _reencode_jpeg(jpeg_b64: str, quality: int) -> str:
    """A base64 JPEG decoded and encoded again at ``quality`` (same size)."""
    with Image.open(io.BytesIO(base64.b64decode(jpeg_b64))) as image:
        return _encode_jpeg(image, max(image.size), quality)


class _EncodedFrames:
    """The frames of one judgement as base64 JPEGs, made smaller after each HTTP 413 as the protocol says."""

    def __init__(self, frames: Sequence[Image.Image], protocol: JudgeProtocol) -> None:
        self._frames = frames
        self._protocol = protocol
        self._side = max(max(f.size) for f in frames)
        if protocol.max_image_side is not None:
            self._side = min(protocol.max_image_side, self._side)
        self._lower = list(protocol.qualities_on_413)
        self._first = [_encode_jpeg(f, self._side, protocol.jpeg_quality) for f in frames]
        self.jpegs = self._first
        """The current base64 JPEGs."""

    def shrink(self) -> bool:
        """Encode the frames smaller; False when the protocol allows nothing smaller."""
        if self._protocol.qualities_on_413:
            if not self._lower:
                return False
            quality = self._lower.pop(0)
            self.jpegs = [_reencode_jpeg(jpeg, quality) for jpeg in self._first]
            logger.warning("judge payload too large (413); frames re-encoded at JPEG quality %d", quality)
            return True
        if self._side <= 64:
            return False
        self._side //= 2
        self.jpegs = [_encode_jpeg(f, self._side, self._protocol.jpeg_quality) for f in self._frames]
        logger.warning("judge payload too large (413); frames down to %d px", self._side)
        return True


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


def upstream_prompt(
    task: str, requirement: str, dimension: str, criteria: Sequence[Criterion], num_frames: int = 8
) -> str:
    """The published evaluator's prompt, character for character, as it builds it from ``MWBenchRubrics.json``.

    It read the task text under keys that file lacks, so Task Description and Detailed
    Requirements are empty (``task`` and ``requirement`` are ignored); it lists only the criteria
    numbered 1..9, under their published numbers (:attr:`Criterion.number`), so a block numbered
    ``d11..d55`` lists none; its "8 video screenshots" are fixed (``num_frames`` is ignored). A
    criterion is a Positive Point iff its sign is positive (the published files write every sign
    ``"+1"`` or ``"-1"``; upstream tests for the string ``"+1"``).
    """
    title = DIMENSION_TITLES[dimension]
    numbered = ((c.number or k, c) for k, c in enumerate(criteria, 1))
    listed = "".join(
        f"{k}. [{'Positive Point' if c.sign > 0 else 'Penalty Point'}] {c.text}\n" for k, c in numbered if 1 <= k <= 9
    )
    return (
        "You are a professional video evaluation expert. Please evaluate this microscopic world scientific "
        f"animation video in the {title} dimension according to the following criteria.\n\n"
        "**Task Description:**\n\n\n"
        "**Detailed Requirements:**\n\n\n"
        f"**{title} Evaluation Criteria:**\n{listed}\n\n"
        "**Evaluation Instructions:**\n"
        "1. Carefully observe the 8 video screenshots arranged in chronological order.\n"
        "2. Judge each evaluation point: mark 1 if the criterion is met, 0 otherwise.\n"
        "3. Positive Points: score 1 if the video meets the standard.\n"
        "4. Penalty Points: score 1 if the video exhibits the described problem.\n"
        "5. Provide detailed reasoning for every judgment.\n\n"
        "**Output Format (strict JSON):**\n"
        "{\n"
        '    "scores": [score1, score2, ...],\n'
        '    "reasoning": "Detailed reasoning explaining the judgment for each criterion."\n'
        "}\n\n"
        'The length of "scores" must equal the number of evaluation points; each element is 0 or 1.'
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


def parse_upstream_answer(text: str) -> tuple[list[int], dict[str, Any]]:
    """Read an answer as the published evaluator and scorer do: ``json.loads`` of the text from the first
    ``{`` to the last ``}``, nothing validated.

    Returns the scores as the published scorer counts them (1 where the value equals 1, else 0),
    as many as the answer gave, and the parsed object. Raises ValueError when there is no object
    with a non-empty ``scores`` list (the published scorer drops such a task).
    """
    start, end = text.find("{"), text.rfind("}")
    if start == -1 or end <= start:
        raise ValueError("no JSON object")
    try:
        data = json.loads(text[start : end + 1])
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("scores"), list) or not data["scores"]:
        raise ValueError("no JSON object with a non-empty 'scores' list")
    return [int(value == 1) for value in data["scores"]], data


OURS = JudgeProtocol(
    name="ours",
    version="mwb-judge-v1",
    prompt=build_prompt,
    temperature=0.0,
    seed=0,
    json_schema=True,
    num_frames=8,
    max_image_side=1024,
    jpeg_quality=90,
    qualities_on_413=(),
    strict=True,
)
"""The default: task text and renumbered criteria in the prompt, repeatable sampling, schema-checked answers."""

UPSTREAM = JudgeProtocol(
    name="upstream",
    version="mwb-upstream-v1",
    prompt=upstream_prompt,
    temperature=None,
    seed=None,
    json_schema=False,
    num_frames=8,
    max_image_side=None,
    jpeg_quality=100,
    qualities_on_413=(30, 20, 10),
    strict=False,
)
"""The published evaluator's request (upstream ``eval/video_evaluator.py``), to reproduce the paper's numbers."""

PROTOCOLS: dict[str, JudgeProtocol] = {p.name: p for p in (OURS, UPSTREAM)}
"""Judge protocols by name."""


@dataclass(frozen=True)
class Judgement:
    """The judge's verdict on one dimension of one video."""

    scores: list[int]
    """0/1 per criterion. Under a non-strict protocol (``upstream``) the answer's scores as the published
    scorer counts them (:func:`parse_upstream_answer`), as many as given: possibly more or fewer than the
    criteria."""
    reasons: list[str]
    """Reason per score (empty strings when the model gave none)."""
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
    parsed: dict[str, Any] | None = None
    """Under a non-strict protocol, the answer's JSON object as parsed, unvalidated (what the published
    evaluator stores as ``parsed_result``); None under a strict one."""


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
        self.protocol = PROTOCOLS[config.protocol]
        """The judge protocol (``config.protocol``)."""
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
        """One chat completion with the protocol's options, dropping those the server rejects."""
        while True:
            params: dict[str, Any] = {
                "response_format": response_schema(n) if self.protocol.json_schema else None,
                "temperature": self.protocol.temperature,
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

    def _send(
        self, prompt: str, encoded: _EncodedFrames, followups: list[dict[str, Any]], n: int, seed: int | None
    ) -> tuple[Any, int, int]:
        """One answered request, re-sent with smaller frames after each HTTP 413 the protocol allows; returns the
        response and its prompt and completion tokens (added to :attr:`usage`)."""
        while True:
            images = [
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + jpeg}} for jpeg in encoded.jpegs
            ]
            messages = [{"role": "user", "content": [{"type": "text", "text": prompt}, *images]}, *followups]
            try:
                response = self._complete(messages, n, seed)
                break
            except openai.APIStatusError as exc:
                if exc.status_code == 413 and encoded.shrink():
                    continue
                if exc.status_code in (401, 403, 404):
                    raise JudgeConfigError(
                        f"judge at {self.config.base_url} refused model {self.config.model!r}: {exc}"
                    ) from exc
                raise JudgeError(f"judge request failed: {exc}") from exc
            except openai.APIConnectionError as exc:
                raise JudgeError(f"judge unreachable: {exc}") from exc
        usage = response.usage
        pt, ct = (usage.prompt_tokens or 0, usage.completion_tokens or 0) if usage else (0, 0)
        with self._lock:
            self.usage.requests += 1
            self.usage.prompt_tokens += pt
            self.usage.completion_tokens += ct
            self.usage.cost_usd += self._cost(pt, ct)
        return response, pt, ct

    def _read(self, text: str, n: int) -> tuple[list[int], list[str], str, dict[str, Any] | None]:
        """``(scores, reasons, reasoning, parsed)`` of an answer, read as the protocol says; ValueError if unusable."""
        if self.protocol.strict:
            return (*parse_answer(text, n), None)
        scores, parsed = parse_upstream_answer(text)
        reasons = parsed.get("reasons")
        if not (isinstance(reasons, list) and len(reasons) == len(scores)):
            reasons = [""] * len(scores)
        return scores, [str(r) for r in reasons], str(parsed.get("reasoning", "")), parsed

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
        protocol = self.protocol
        n = len(criteria)
        prompt = protocol.prompt(task, requirement, dimension, criteria, len(frames))
        seed = None if protocol.seed is None else protocol.seed + repeat
        encoded = _EncodedFrames(frames, protocol)
        followups: list[dict[str, Any]] = []
        tokens = [0, 0]  # prompt, completion
        requests = 1 + (self.config.max_reasks if protocol.strict else 0)
        last_error = "no answer"
        for attempt in range(1, requests + 1):
            response, pt, ct = self._send(prompt, encoded, followups, n, seed)
            tokens[0] += pt
            tokens[1] += ct
            text = (response.choices[0].message.content or "") if response.choices else ""
            try:
                scores, reasons, reasoning, parsed = self._read(text, n)
            except ValueError as exc:
                last_error = str(exc)
                if protocol.strict:
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
            cost = self._cost(tokens[0], tokens[1])
            return Judgement(scores, reasons, reasoning, text, tokens[0], tokens[1], cost, attempt, parsed=parsed)
        raise JudgeError(f"no valid answer after {requests} request(s): {last_error}")
