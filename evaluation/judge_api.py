"""Library behind the service's ``/judge`` endpoint, and a guarded fetch of public video URLs.

:class:`JudgeService` judges one video against a benchmark task or a custom rubric in the
published block format and returns a :class:`JudgeResponse`. Bad input raises
:class:`JudgeInputError` (map to HTTP 4xx); a judge that gives no valid answer raises
:class:`~evaluation.judge.JudgeError` (map to 502).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, Field, model_validator

from .cache import JudgementCache
from .judge import JudgeConfig, JudgeError, VideoError, VLMJudge, sample_frames
from .microworldbench import DIMENSIONS, Benchmark, Criterion, RubricError, Task, load_benchmark, parse_block
from .scoring import dimension_raw, normalise

logger = logging.getLogger(__name__)


class JudgeInputError(ValueError):
    """Bad ``/judge`` input; ``field`` names the offending request field."""

    def __init__(self, field: str, message: str, status_code: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        """The request field at fault."""
        self.message = message
        """What is wrong."""
        self.status_code = status_code
        """Suggested HTTP status (400, 404, 413, 422)."""


MAX_RUBRIC_WEIGHT = 1e6
"""Largest weight a custom rubric may give a criterion: scores stay finite however many criteria it has."""

NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")
"""The well-known NAT64 prefix (RFC 6052): its last 32 bits are the IPv4 address reached."""
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
"""Deprecated IPv4-compatible addresses (RFC 4291): ``::127.0.0.1``, which ``ipaddress`` calls global."""
NOT_GLOBAL_IPV6 = (ipaddress.IPv6Network("64:ff9b:1::/48"),)
"""Non-global IPv6 ranges ``ipaddress`` may not know: the local-use NAT64 prefix (RFC 8215)."""


class CustomRubric(BaseModel):
    """A rubric in the published format: task text plus one or more ``rubrics_<dimension>`` blocks.

    Weights must be finite and at most :data:`MAX_RUBRIC_WEIGHT`.
    """

    task: str = Field("", description="Task text (the generation prompt).")
    requirement: str = Field("", description="Detailed requirements shown to the judge.")
    rubrics_scientific: dict[str, Any] | None = Field(None, description="Block of d<k>/s<k>/w<k> keys.")
    rubrics_visual: dict[str, Any] | None = Field(None, description="Block of d<k>/s<k>/w<k> keys.")
    rubrics_instruction: dict[str, Any] | None = Field(None, description="Block of d<k>/s<k>/w<k> keys.")


class JudgeRequest(BaseModel):
    """``POST /judge`` JSON body (the uploaded-file variant passes the bytes separately)."""

    task_index: int | None = Field(None, description="MicroWorldBench task index (1..459).")
    rubric: CustomRubric | None = Field(None, description="Custom rubric instead of a task index.")
    video_base64: str | None = Field(None, description="The mp4, base64-encoded.")
    job_id: str | None = Field(None, description="A video job of this service.")
    video_url: str | None = Field(None, description="Public http(s) URL of an mp4.")

    @model_validator(mode="after")
    def _one_of_each(self) -> JudgeRequest:
        if (self.task_index is None) == (self.rubric is None):
            raise ValueError("give exactly one of task_index and rubric")
        if sum(v is not None for v in (self.video_base64, self.job_id, self.video_url)) > 1:
            raise ValueError("give at most one of video_base64, job_id and video_url (or upload a file)")
        return self


class CriterionJudgement(BaseModel):
    """The judgement of one criterion."""

    number: int = Field(description="Criterion number, 1-based.")
    text: str = Field(description="The criterion.")
    kind: Literal["positive", "penalty"] = Field(description="Positive point, or penalty point (1 = problem present).")
    weight: float = Field(description="Scoring weight.")
    judgement: int = Field(description="0 or 1.")
    reasoning: str = Field(description="The judge's reason for this criterion.")


class DimensionJudgement(BaseModel):
    """One dimension's judgement and score."""

    dimension: str = Field(description="scientific, visual or instruction.")
    score: float = Field(description="max(0, R/M) * 100.")
    raw: float = Field(description="R = sum x_k s_k w_k.")
    max: float = Field(description="M = sum of positive weights.")
    reasoning: str = Field(description="The judge's overall reasoning.")
    criteria: list[CriterionJudgement] = Field(description="Per-criterion judgements.")


class JudgeResponse(BaseModel):
    """The structured judgement of a video."""

    task_index: int | None = Field(description="Benchmark task, or None for a custom rubric.")
    judge_model: str = Field(description="Judge model.")
    prompt_version: str = Field(description="Judge protocol version (ours: mwb-judge-v1).")
    video_sha256: str = Field(description="SHA-256 of the judged video.")
    dimensions: list[DimensionJudgement] = Field(description="Judged dimensions.")
    task_score: float = Field(description="Pooled max(0, sum R / sum M) * 100 over the judged dimensions.")
    prompt_tokens: int = Field(description="Judge prompt tokens spent (0 when cached).")
    completion_tokens: int = Field(description="Judge completion tokens spent (0 when cached).")
    cost_usd: float = Field(description="Judge cost of this request (0 when cached).")


class JudgeService:
    """Judges single videos for the service; reuses a cache so repeated requests cost nothing."""

    def __init__(
        self, config: JudgeConfig, benchmark: Benchmark | str | Path | None = None, cache_path: Path | None = None
    ) -> None:
        self.judge = VLMJudge(config)
        self._benchmark = benchmark
        self._cache = JudgementCache(cache_path) if cache_path else None

    @property
    def benchmark(self) -> Benchmark:
        """The benchmark (loaded on first use)."""
        if not isinstance(self._benchmark, Benchmark):
            self._benchmark = load_benchmark(self._benchmark)
        return self._benchmark

    def _task(self, task_index: int | None, rubric: CustomRubric | dict[str, Any] | None) -> Task:
        if (task_index is None) == (rubric is None):
            raise JudgeInputError("task_index", "give exactly one of task_index and rubric", 400)
        if task_index is not None:
            task = self.benchmark.tasks.get(task_index)
            if task is None:
                raise JudgeInputError(
                    "task_index", f"unknown task {task_index} (valid: 1..{max(self.benchmark.tasks)})", 404
                )
            return task
        if isinstance(rubric, dict):
            rubric = CustomRubric.model_validate(rubric)
        blocks = {d: getattr(rubric, f"rubrics_{d}") for d in DIMENSIONS}
        if all(b is None for b in blocks.values()):
            raise JudgeInputError(
                "rubric", "needs at least one of rubrics_scientific, rubrics_visual, rubrics_instruction"
            )
        criteria: dict[str, tuple[Criterion, ...]] = {}
        for dim, block in blocks.items():
            if block is None:
                continue
            try:
                criteria[dim], _ = parse_block(block, where=f"rubrics_{dim}")
            except RubricError as exc:
                raise JudgeInputError(f"rubric.rubrics_{dim}", str(exc)) from None
            _check_weights(criteria[dim], f"rubric.rubrics_{dim}")
        return Task(index=0, task=rubric.task, requirement=rubric.requirement, level=None, rubrics=criteria)

    def judge_video(
        self, video: bytes | Path, *, task_index: int | None = None, rubric: CustomRubric | dict[str, Any] | None = None
    ) -> JudgeResponse:
        """Judge a video (bytes or a local mp4 path) against a task or a custom rubric."""
        task = self._task(task_index, rubric)
        data = Path(video).read_bytes() if isinstance(video, (str, Path)) else bytes(video)
        try:
            frames = sample_frames(data, self.judge.protocol.num_frames)
        except VideoError as exc:
            raise JudgeInputError("video", f"not a decodable video ({exc})") from None
        sha = hashlib.sha256(data).hexdigest()
        model = self.judge.config.model
        dims: list[DimensionJudgement] = []
        spent = [0, 0, 0.0]
        total_raw = total_max = 0.0
        for dim, criteria in task.rubrics.items():
            key = (sha, task.index, dim, task.rubric_hash(dim), model, self.judge.protocol.version)
            judgement = self._cache.get(*key) if self._cache else None
            if judgement is None:
                judgement = self.judge.judge(frames, task.task, task.requirement, dim, criteria)
                spent[0] += judgement.prompt_tokens
                spent[1] += judgement.completion_tokens
                spent[2] += judgement.cost_usd
                if self._cache:
                    self._cache.put(*key, judgement)
            if len(judgement.scores) != len(criteria):  # possible under a protocol that does not re-ask
                raise JudgeError(f"{dim}: {len(judgement.scores)} scores for {len(criteria)} criteria")
            raw, max_possible = dimension_raw(criteria, judgement.scores)
            total_raw += raw
            total_max += max_possible
            dims.append(
                DimensionJudgement(
                    dimension=dim,
                    score=normalise(raw, max_possible),
                    raw=raw,
                    max=max_possible,
                    reasoning=judgement.reasoning,
                    criteria=[
                        CriterionJudgement(
                            number=k,
                            text=c.text,
                            kind="positive" if c.sign > 0 else "penalty",
                            weight=c.weight,
                            judgement=x,
                            reasoning=r,
                        )
                        for k, (c, x, r) in enumerate(
                            zip(criteria, judgement.scores, judgement.reasons, strict=True), 1
                        )
                    ],
                )
            )
        return JudgeResponse(
            task_index=task_index,
            judge_model=model,
            prompt_version=self.judge.protocol.version,
            video_sha256=sha,
            dimensions=dims,
            task_score=normalise(total_raw, total_max),
            prompt_tokens=spent[0],
            completion_tokens=spent[1],
            cost_usd=spent[2],
        )

    def handle(
        self,
        request: JudgeRequest,
        upload: bytes | None = None,
        job_video: Callable[[str], Path | None] | None = None,
        max_bytes: int = 200 * 1024 * 1024,
        fetch_timeout_s: float = 30.0,
    ) -> JudgeResponse:
        """Resolve the request's video (upload, base64, job id, or public URL) and judge it.

        ``job_video`` maps a job id of the service to its finished mp4 (None if unknown or
        not finished).
        """
        _check_text(request.model_dump(exclude_none=True))
        sources = [
            upload is not None,
            request.video_base64 is not None,
            request.job_id is not None,
            request.video_url is not None,
        ]
        if sum(sources) != 1:
            raise JudgeInputError("video", "give exactly one of an uploaded file, video_base64, job_id, video_url", 400)
        if upload is not None:
            video: bytes | Path = upload
        elif request.video_base64 is not None:
            try:
                video = base64.b64decode(request.video_base64, validate=True)
            except (binascii.Error, ValueError):
                raise JudgeInputError("video_base64", "not valid base64") from None
        elif request.job_id is not None:
            path = job_video(request.job_id) if job_video else None
            if path is None:
                raise JudgeInputError("job_id", f"no finished video for job {request.job_id!r}", 404)
            video = path
        else:
            video = fetch_public_video(request.video_url, max_bytes=max_bytes, timeout_s=fetch_timeout_s)
        if isinstance(video, bytes) and len(video) > max_bytes:
            raise JudgeInputError("video", f"larger than {max_bytes} bytes", 413)
        return self.judge_video(video, task_index=request.task_index, rubric=request.rubric)


def _check_weights(criteria: tuple[Criterion, ...], where: str) -> None:
    """Refuse a custom rubric weight above :data:`MAX_RUBRIC_WEIGHT` (huge weights overflow the score to inf)."""
    for criterion in criteria:
        if criterion.weight > MAX_RUBRIC_WEIGHT:
            message = f"weight {criterion.weight:g} is above the limit of {MAX_RUBRIC_WEIGHT:g}"
            raise JudgeInputError(f"{where}.w{criterion.number}", message)


def _check_text(data: Any) -> None:
    """Raise :class:`JudgeInputError` (400) naming the first string in ``data`` (a request as plain data, keys
    included) that UTF-8 cannot encode: a lone surrogate, which no judge prompt, hash or response can carry."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:  # iterative: nesting depth costs no recursion
        where, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise JudgeInputError(where or "body", f"not valid UTF-8 text: a lone surrogate at character "
                                      f"{exc.start}", 400) from None
        elif isinstance(value, dict):
            for key, item in value.items():
                path = f"{where}.{key}" if where else str(key)
                stack += [(path, key), (path, item)]
        elif isinstance(value, list):
            stack += [(f"{where}[{i}]", item) for i, item in enumerate(value)]


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for globally routable unicast addresses (no loopback, private, link-local, multicast, reserved).

    An IPv6 address that carries an IPv4 one (IPv4-mapped or -compatible, 6to4, Teredo, NAT64) is judged by
    the IPv4 address(es) it leads to: ``2002:7f00:1::`` is loopback.
    """
    if isinstance(address, ipaddress.IPv6Address):
        if any(address in net for net in NOT_GLOBAL_IPV6):
            return False
        embedded = _embedded_ipv4(address)
        if embedded:
            return all(is_public_address(a) for a in embedded)
    return address.is_global and not (address.is_multicast or address.is_reserved or address.is_unspecified)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address leads to (its Teredo server and client both), or [] when none."""
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped]
    if address.sixtofour is not None:
        return [address.sixtofour]
    if address.teredo is not None:
        return list(address.teredo)
    if address in NAT64_PREFIX or address in IPV4_COMPATIBLE:  # the IPv4 address is the last 32 bits
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    return []


def _resolve_checked(host: str, port: int, allowed: Callable[[Any], bool]) -> str:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise JudgeInputError("video_url", f"cannot resolve {host!r}: {exc}", 400) from None
    addresses = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}
    forbidden = [str(a) for a in addresses if not allowed(a)]
    if forbidden or not addresses:
        raise JudgeInputError("video_url", f"{host!r} resolves to a non-public address ({', '.join(forbidden)})", 400)
    return str(sorted(addresses, key=lambda a: a.version)[0])


def fetch_public_video(
    url: str,
    max_bytes: int,
    timeout_s: float,
    *,
    max_redirects: int = 3,
    allowed: Callable[[Any], bool] = is_public_address,
) -> bytes:
    """Download a video over http(s) from a public address, within a size and time limit.

    The host is resolved and every address checked with ``allowed``; the connection goes to
    the checked address (the name is kept for the Host header and TLS SNI), so DNS rebinding
    cannot redirect it. Redirects are followed by hand and checked the same way.
    """
    limit = _DownloadLimit(max_bytes, timeout_s, time.monotonic() + timeout_s)
    for _ in range(max_redirects + 1):
        target = _pin(url, allowed)
        body, location = _get_pinned(target, limit)
        if location is None:
            return body
        try:
            url = urljoin(url, location)
        except ValueError:  # a Location that is no URL, e.g. "http://[::1/"
            raise JudgeInputError("video_url", f"redirected to an invalid URL {location!r}", 400) from None
    raise JudgeInputError("video_url", f"more than {max_redirects} redirects", 400)


class _DownloadLimit(NamedTuple):
    """How much and how long one fetch (redirects included) may download."""

    max_bytes: int
    """Largest body accepted."""
    timeout_s: float
    """The whole fetch's time limit (for the error message)."""
    deadline: float
    """``time.monotonic()`` past which the download is given up."""

    def remaining(self) -> float:
        """Seconds left; raises once none are."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise self.too_slow()
        return remaining

    def too_slow(self) -> JudgeInputError:
        """The error of a download past the deadline."""
        return JudgeInputError("video_url", f"download took longer than {self.timeout_s} s", 408)

    def too_large(self) -> JudgeInputError:
        """The error of a body over ``max_bytes``."""
        return JudgeInputError("video_url", f"video larger than {self.max_bytes} bytes", 413)


class _PinnedURL(NamedTuple):
    """A URL whose host has been resolved and checked, and the names to send with it."""

    url: str
    """The URL with the host replaced by its checked address."""
    host_header: str
    """``Host`` header: the name (and port, when the URL gave one)."""
    hostname: str
    """The name, for TLS SNI."""


def _pin(url: str, allowed: Callable[[Any], bool]) -> _PinnedURL:
    """Check ``url``'s scheme and host, resolve the host and pin the URL to an address ``allowed`` accepts."""
    try:
        parts = urlsplit(url)
        given_port = parts.port  # ValueError beyond 65535
        hostname = (parts.hostname or "").encode("idna").decode("ascii")  # UnicodeError (a ValueError) if no name
    except ValueError as exc:
        raise JudgeInputError("video_url", f"not a valid URL ({exc})", 400) from None
    if parts.scheme not in ("http", "https"):
        raise JudgeInputError("video_url", f"only http and https URLs are fetched, not {parts.scheme or 'none'!r}", 400)
    if not hostname or parts.username or parts.password:
        raise JudgeInputError("video_url", "URL needs a host and no credentials", 400)
    port = given_port or (443 if parts.scheme == "https" else 80)
    ip = _resolve_checked(hostname, port, allowed)
    netloc = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    host_header = hostname if given_port is None else f"{hostname}:{given_port}"
    return _PinnedURL(pinned, host_header, hostname)


def _get_pinned(target: _PinnedURL, limit: _DownloadLimit) -> tuple[bytes, str | None]:
    """One GET of ``target`` within ``limit``: (body, None), or (b"", location) for a redirect."""
    remaining = limit.remaining()
    try:
        with (
            httpx.Client(timeout=remaining, follow_redirects=False) as client,
            client.stream(
                "GET", target.url, headers={"Host": target.host_header}, extensions={"sni_hostname": target.hostname}
            ) as response,
        ):
            if response.is_redirect:
                return b"", response.headers.get("location", "")
            return _read_body(response, limit), None
    except httpx.HTTPError as exc:
        raise JudgeInputError("video_url", f"download failed: {exc}", 400) from None


def _read_body(response: httpx.Response, limit: _DownloadLimit) -> bytes:
    """The body of a 200 answer, refused as soon as it passes ``limit``'s size or deadline."""
    if response.status_code != 200:
        raise JudgeInputError("video_url", f"server answered {response.status_code}", 400)
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit.max_bytes:
        raise limit.too_large()
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > limit.max_bytes:
            raise limit.too_large()
        if time.monotonic() > limit.deadline:
            raise limit.too_slow()
        chunks.append(chunk)
    return b"".join(chunks)
