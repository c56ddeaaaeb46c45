"""HTTP routes: ``/generate``, ``/info``, ``/v1/videos*``; mounted into BentoML by ``service.py``.

Handlers only translate HTTP to the runtime's objects; all of them share one submission path
(validation -> durable job -> batch worker), so ``/generate`` and ``/v1/videos`` batch together.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from .errors import APIError, install_handlers, json_body_spec, validation_message
from .jobs import Job
from .openai_api import build_router
from .runtime import Runtime
from .schemas import GenerateRequest, GenerationSpec, InputError, resolve
from .ui import router as ui_router

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
MAX_BODY_BYTES = 64 * 1024
MAX_UPLOAD_BYTES = 200 * 1024 * 1024
UNPROTECTED = ("/livez", "/readyz", "/healthz", "/ui")  # the page holds no data; its API calls send the key


def get_runtime(request: Request, need_engine: bool = False) -> Runtime:
    rt: Runtime | None = getattr(request.app.state, "runtime", None)
    if rt is None:
        raise APIError(503, "the service is starting", None, "starting", {"Retry-After": "5"})
    if need_engine and not rt.ready:
        raise APIError(503, f"the model is not loaded: {rt.load_error}", None, "model_not_loaded")
    return rt


def owner_of(request: Request) -> str | None:
    """A stable, non-secret id of the caller's API key (jobs are scoped to it), or None."""
    auth = request.headers.get("authorization", "")
    return hashlib.sha256(auth.encode()).hexdigest()[:16] if auth else None


async def parse_body(request: Request, model: type[M]) -> M:
    """JSON, multipart or urlencoded body -> ``model``; 400 naming the field on any problem."""
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"request body is larger than {MAX_BODY_BYTES} bytes", None, "body_too_large")
    ctype = request.headers.get("content-type", "")
    if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form()
        data = {}
        for key, value in form.multi_items():
            if not isinstance(value, str):
                raise APIError(400, f"file uploads are not supported for '{key}'", key, "unsupported")
            data[key] = value
    else:
        try:
            data = json.loads(raw or b"null")
        except ValueError as exc:
            raise APIError(400, f"the body is not valid JSON: {exc}", "body", "invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object", "body", "invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        param, message = validation_message(exc.errors()[0])
        raise APIError(400, message, param, "invalid_value") from None


def submit(rt: Runtime, spec: GenerationSpec, kind: str, owner: str | None) -> Job:
    """Queue a validated request durably, or answer 429 when the queue is full."""
    if rt.store.count() >= rt.settings.max_queue:
        raise APIError(429, f"the queue is full ({rt.settings.max_queue} jobs); retry later",
                       None, "queue_full", {"Retry-After": str(retry_after_s(rt))})
    if rt.store.count(owner=owner or "") >= rt.settings.max_active_per_key:
        raise APIError(429, f"this API key already has {rt.settings.max_active_per_key} jobs waiting or running",
                       None, "too_many_active_jobs", {"Retry-After": str(retry_after_s(rt))})
    job = rt.store.create(spec, rt.engine.model.name, kind=kind, owner=owner)
    rt.worker.notify()
    logger.info("queued %s (%s, %dx%dx%d, %d steps, seed %d): %s", job.id, kind, spec.width, spec.height,
                spec.num_frames, spec.num_inference_steps, spec.seed,
                prompt_for_log(spec.prompt, rt.settings.redact_prompts))
    return job


def prompt_for_log(prompt: str, redact: bool) -> str:
    """The prompt as logged: quoted (first 200 characters), or only its hash and length when redacting."""
    if redact:
        return f"<prompt redacted: sha256 {hashlib.sha256(prompt.encode()).hexdigest()[:12]}, {len(prompt)} chars>"
    return repr(prompt[:200])


def retry_after_s(rt: Runtime) -> int:
    """A rough wait: the recent engine-call time x queued batches, at least 1 s."""
    per_call = rt.worker.mean_call_s or 5.0
    batches = rt.store.count() / max(1, rt.settings.max_batch_size)
    return max(1, int(per_call * batches + 0.999))


def finished_video(rt: Runtime, job_id: str):
    """Path of a completed job's mp4, or None."""
    job = rt.store.get(job_id)
    if job is None or job.status != "completed":
        return None
    path = rt.store.video_path(job.id)
    return path if path.is_file() else None


async def parse_judge_body(request: Request):
    """``/judge`` body: JSON, or multipart with a ``video`` file and the other fields as form fields."""
    from evaluation.judge_api import JudgeRequest

    if int(request.headers.get("content-length") or 0) > MAX_UPLOAD_BYTES:
        raise APIError(413, f"request body is larger than {MAX_UPLOAD_BYTES} bytes", "video", "body_too_large")
    upload = None
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form(max_part_size=MAX_UPLOAD_BYTES)
        data = {}
        for key, value in form.multi_items():
            if isinstance(value, str):
                data[key] = value
            elif key == "video":
                upload = await value.read()
            else:
                raise APIError(400, f"unexpected file field '{key}'; upload the video as 'video'", key, "invalid_value")
        if "rubric" in data:
            try:
                data["rubric"] = json.loads(data["rubric"])
            except ValueError:
                raise APIError(400, "rubric must be a JSON object", "rubric", "invalid_value") from None
    else:
        try:
            data = json.loads(await request.body() or b"null")
        except ValueError as exc:
            raise APIError(400, f"the body is not valid JSON: {exc}", "body", "invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object", "body", "invalid_json")
    try:
        return JudgeRequest.model_validate(data), upload
    except ValidationError as exc:
        param, message = validation_message(exc.errors()[0])
        raise APIError(400, message, param, "invalid_value") from None


def create_app() -> FastAPI:
    """The FastAPI app; ``app.state.runtime`` is set by whoever starts the service."""
    app = FastAPI(title="MicroVerse", version="0.1.0",
                  description="Text-to-video for micro-world simulation (Wan2.1 architecture).")
    install_handlers(app)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        rt = getattr(request.app.state, "runtime", None)
        key = rt.settings.api_key if rt is not None else None
        if key is not None and not request.url.path.startswith(UNPROTECTED):
            given = request.headers.get("authorization", "")
            expected = f"Bearer {key.get_secret_value()}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                from .errors import error_response

                return error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                      None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.post("/generate", response_class=Response, openapi_extra=json_body_spec(GenerateRequest),
              responses={200: {"content": {"video/mp4": {}}, "description": "The video (H.264 mp4)."}})
    async def generate(request: Request):
        """Generate one video synchronously; returns ``video/mp4`` with X-Seed and timing headers."""
        rt = get_runtime(request, need_engine=True)
        req = await parse_body(request, GenerateRequest)
        try:
            spec = resolve(req, rt.engine.model.defaults, rt.limits)
        except InputError as exc:
            raise APIError(400, exc.message, exc.param, "invalid_value") from exc
        job = submit(rt, spec, "sync", owner_of(request))
        try:
            await asyncio.wait_for(rt.worker.wait_future(job.id), rt.settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(504, f"the video was not ready within {rt.settings.request_timeout_s:g} s; it is still "
                           f"being made as job {job.id} (GET /v1/videos/{job.id})", None, "timeout") from None
        done = rt.store.get(job.id)
        if done is None:
            raise APIError(409, "the job was cancelled", None, "cancelled")
        if done.status in ("queued", "in_progress"):  # the worker stopped for a shutdown
            raise APIError(503, f"the server is shutting down; the request was re-queued as job {done.id}",
                           None, "shutting_down", {"Retry-After": "10"})
        if done.status != "completed":
            raise APIError(500 if done.error_code != "storage_error" else 507,
                           f"generation failed: {done.error_message}", None, done.error_code)
        t = done.timings
        headers = {"X-Seed": str(spec.seed), "X-Job-Id": done.id,
                   "X-Batch-Size": str(t.get("batch_size", 1)),
                   "Server-Timing": ", ".join(f"{k.removesuffix('_s')};dur={v * 1000:.1f}"
                                              for k, v in t.items() if k.endswith("_s"))}
        return Response(rt.store.video_path(done.id).read_bytes(), media_type="video/mp4", headers=headers)

    @app.get("/info")
    async def info(request: Request):
        """Model source, architecture, dtype, device, attention backend, quantization, versions."""
        return get_runtime(request).info()

    from evaluation.judge_api import JudgeRequest

    @app.post("/judge", openapi_extra=json_body_spec(JudgeRequest))
    async def judge(request: Request):
        """Judge a video (upload, base64, job id or public URL) against a task index or a custom rubric."""
        rt = get_runtime(request)
        if rt.judge is None:
            raise APIError(503, "no judge is configured: set MICROVERSE_JUDGE_BASE_URL, MICROVERSE_JUDGE_MODEL "
                           "and MICROVERSE_JUDGE_API_KEY (any OpenAI-compatible vision-language model)",
                           None, "judge_not_configured")
        judge_request, upload = await parse_judge_body(request)
        return await run_in_threadpool(rt.judge.handle, judge_request, upload, lambda jid: finished_video(rt, jid),
                                       MAX_UPLOAD_BYTES)

    app.include_router(build_router(get_runtime, parse_body, submit, owner_of), prefix="/v1")
    app.include_router(ui_router)
    return app
