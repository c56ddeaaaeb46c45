"""OpenAI-compatible video jobs: protocol models and the ``/v1/videos`` router.

The official ``openai`` client works unchanged with ``base_url`` pointed at ``<service>/v1``:
``videos.create`` (multipart or JSON), ``retrieve``, ``list``, ``delete``, ``download_content``.
"""

from __future__ import annotations

import logging
import re
from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from .errors import APIError, json_body_spec
from .jobs import JOB_ID_RE, Job
from .schemas import GenerateRequest, InputError, resolve

logger = logging.getLogger(__name__)

POLL_AFTER_MS = 250
SIZE_RE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class VideoCreateBody(BaseModel):
    """``POST /v1/videos``: OpenAI's fields plus MicroVerse's extras (sent via ``extra_body``)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    size: str | None = Field(None, description='"WIDTHxHEIGHT", e.g. "832x480".')
    seconds: float | None = Field(None, description="Clip length; converted to 4k+1 frames at fps.")
    negative_prompt: str | None = None
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    num_frames: int | None = Field(None, description="Overrides seconds when given (4k+1).")
    fps: int | None = None


class VideoError(BaseModel):
    code: str
    message: str


class VideoObject(BaseModel):
    """OpenAI's ``Video`` object, plus the generation parameters used."""

    id: str
    object: Literal["video"] = "video"
    created_at: int
    completed_at: int | None
    expires_at: int | None
    status: Literal["queued", "in_progress", "completed", "failed"]
    model: str
    progress: int
    prompt: str
    seconds: str
    size: str
    error: VideoError | None
    remixed_from_video_id: str | None = None
    seed: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    fps: int


def to_video_object(job: Job) -> VideoObject:
    s = job.spec
    return VideoObject(
        id=job.id, created_at=int(job.created_at),
        completed_at=int(job.completed_at) if job.completed_at else None,
        expires_at=int(job.expires_at) if job.expires_at else None,
        status=job.status, model=job.model, progress=job.progress, prompt=s.prompt,
        seconds=f"{s.seconds:g}", size=f"{s.width}x{s.height}",
        error=VideoError(code=job.error_code or "error", message=job.error_message or "") if job.status == "failed" else None,
        seed=s.seed, num_frames=s.num_frames, num_inference_steps=s.num_inference_steps,
        guidance_scale=s.guidance_scale, fps=s.fps,
    )


def to_generate_request(body: VideoCreateBody, fps_default: int, max_frames: int) -> GenerateRequest:
    """Map OpenAI's size/seconds onto our request fields."""
    width = height = None
    if body.size is not None:
        m = SIZE_RE.match(body.size.strip())
        if not m:
            raise InputError("size", f'size must look like "832x480" (width x height), got {body.size!r}')
        width, height = int(m.group(1)), int(m.group(2))
    num_frames = body.num_frames
    fps = body.fps or fps_default
    if num_frames is None and body.seconds is not None:
        if body.seconds <= 0:
            raise InputError("seconds", f"seconds must be positive, got {body.seconds:g}")
        num_frames = 4 * max(0, round((body.seconds * fps - 1) / 4)) + 1  # nearest 4k+1
        if num_frames > max_frames:
            raise InputError("seconds", f"seconds={body.seconds:g} at {fps} fps is {num_frames} frames; the limit is {max_frames}")
    return GenerateRequest(prompt=body.prompt, negative_prompt=body.negative_prompt, height=height, width=width,
                           num_frames=num_frames, num_inference_steps=body.num_inference_steps,
                           guidance_scale=body.guidance_scale, seed=body.seed, fps=body.fps)


def _job_or_404(rt, job_id: str, owner: str | None) -> Job:
    if not JOB_ID_RE.match(job_id):
        raise APIError(404, f"no video with id {job_id!r}", "video_id", "not_found")
    job = rt.store.get(job_id)
    if job is None or (owner is not None and job.owner not in (None, owner)):
        raise APIError(404, f"no video with id {job_id!r}", "video_id", "not_found")
    return job


def build_router(get_runtime, parse_body, submit, owner_of) -> APIRouter:
    """The ``/v1`` router. Helpers come from ``api`` so both surfaces share one code path."""
    router = APIRouter()

    @router.post("/videos", response_model=VideoObject, openapi_extra=json_body_spec(VideoCreateBody))
    async def create_video(request: Request):
        rt = get_runtime(request, need_engine=True)
        body = await parse_body(request, VideoCreateBody)
        model = rt.engine.model
        if body.model is not None and body.model not in (model.name, "microverse"):
            raise APIError(400, f"model {body.model!r} is not served here; this server serves {model.name!r}",
                           "model", "model_not_found")
        try:
            spec = resolve(to_generate_request(body, model.defaults.fps, rt.settings.max_frames),
                           model.defaults, rt.limits)
        except InputError as exc:
            raise APIError(400, exc.message, exc.param, "invalid_value") from exc
        job = submit(rt, spec, "api", owner_of(request))
        return to_video_object(job)

    @router.get("/videos/{video_id}", response_model=VideoObject)
    async def retrieve_video(video_id: str, request: Request):
        rt = get_runtime(request)
        obj = to_video_object(_job_or_404(rt, video_id, owner_of(request)))
        return JSONResponse(obj.model_dump(mode="json"), headers={"openai-poll-after-ms": str(POLL_AFTER_MS)})

    @router.get("/videos")
    async def list_videos(request: Request, after: str | None = None,
                          limit: int = Query(20, ge=1, le=100), order: Literal["asc", "desc"] = "desc"):
        rt = get_runtime(request)
        try:
            jobs = rt.store.list(limit=limit + 1, after=after, order=order, owner=owner_of(request))
        except KeyError:
            raise APIError(400, f"after={after!r} is not a known video id", "after", "invalid_value") from None
        page = [to_video_object(j).model_dump(mode="json") for j in jobs[:limit]]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(jobs) > limit}

    @router.delete("/videos/{video_id}")
    async def delete_video(video_id: str, request: Request):
        rt = get_runtime(request)
        job = _job_or_404(rt, video_id, owner_of(request))
        rt.store.delete(job.id)
        if rt.worker is not None:
            rt.worker.cancel(job.id)
        return {"id": job.id, "object": "video.deleted", "deleted": True}

    @router.get("/videos/{video_id}/content")
    async def download_content(video_id: str, request: Request,
                               variant: Literal["video", "thumbnail", "spritesheet"] = "video"):
        rt = get_runtime(request)
        job = _job_or_404(rt, video_id, owner_of(request))
        if job.status != "completed":
            raise APIError(409, f"video {job.id} is {job.status}; content is available once it is completed",
                           "video_id", "video_not_ready")
        if variant == "spritesheet":
            raise APIError(400, "variant=spritesheet is not supported; use video or thumbnail", "variant", "unsupported")
        path = rt.store.video_path(job.id) if variant == "video" else rt.store.thumb_path(job.id)
        if not path.is_file():
            raise APIError(404, f"the files of video {job.id} are gone (expired or deleted)", "video_id", "not_found")
        return FileResponse(path, media_type="video/mp4" if variant == "video" else "image/webp",
                            filename=path.name)

    return router
