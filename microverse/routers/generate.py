"""``POST /generate``: one video, synchronously, as ``video/mp4`` (queued with the ``/v1/videos`` jobs)."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ..deps import EngineRuntimeDep, OwnerDep, image_body_rules, read_body
from ..errors import APIError, json_body_spec
from ..images import attach_reference, reference_bytes
from ..jobs import Job
from ..runtime import Runtime
from ..schemas import GenerateRequest, GenerationSpec, InputError, resolve
from ..submission import submit

logger = logging.getLogger(__name__)

router = APIRouter()


@router.post("/generate", response_class=Response, openapi_extra=json_body_spec(GenerateRequest),
             responses={200: {"content": {"video/mp4": {}}, "description": "The video (H.264 mp4)."}})
async def generate(request: Request, rt: EngineRuntimeDep, owner: OwnerDep) -> Response:
    """Generate one video synchronously; returns ``video/mp4`` with X-Seed and timing headers."""
    req, upload = await read_body(request, GenerateRequest, image_body_rules(
        request, rt.engine.model.family.image != "none", "image"))
    try:
        image = reference_bytes(upload, req.image, "image")
        spec = resolve(req, rt.engine.model.defaults_for(req.lora), rt.limits)
        spec = await run_in_threadpool(attach_reference, spec, rt.engine.model.family, image, "image",
                                       rt.settings.reference_store)
    except InputError as exc:
        raise APIError(400, exc.message, exc.param, "invalid_value") from exc
    done = await wait_for_video(rt, submit(rt, spec, "sync", owner))
    return Response(await run_in_threadpool(rt.store.read_file, done.id, ".mp4"), media_type="video/mp4",
                    headers=video_headers(spec, done))


async def wait_for_video(rt: Runtime, job: Job) -> Job:
    """The job once the worker completed it; any other outcome is answered as an error."""
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
    return done


def video_headers(spec: GenerationSpec, done: Job) -> dict[str, str]:
    """X-Seed, X-Job-Id, X-Batch-Size and a Server-Timing entry per timed stage."""
    t = done.timings
    return {"X-Seed": str(spec.seed), "X-Job-Id": done.id, "X-Batch-Size": str(t.get("batch_size", 1)),
            "Server-Timing": ", ".join(f"{k.removesuffix('_s')};dur={v * 1000:.1f}"
                                       for k, v in t.items() if k.endswith("_s"))}
