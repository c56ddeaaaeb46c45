"""OpenAI-compatible video jobs under ``/v1/videos`` (models in ``microverse.protocol``)."""

from __future__ import annotations

import logging
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from ..deps import EngineRuntimeDep, OwnerDep, RuntimeDep, image_body_rules, read_body
from ..errors import APIError, json_body_spec
from ..images import attach_reference, reference_bytes
from ..jobs import JOB_ID_RE, Job
from ..protocol import VideoCreateBody, VideoObject, to_generate_request, to_video_object
from ..runtime import Runtime
from ..schemas import InputError, resolve
from ..submission import submit

logger = logging.getLogger(__name__)

POLL_AFTER_MS = 250

router = APIRouter(prefix="/v1")


def job_or_404(rt: Runtime, job_id: str, owner: str | None) -> Job:
    """The caller's job ``job_id``; 404 when it is unknown or another key's."""
    if not JOB_ID_RE.match(job_id):
        raise APIError(404, f"no video with id {job_id!r}", "video_id", "not_found")
    job = rt.store.get(job_id)
    if job is None or (owner is not None and job.owner not in (None, owner)):
        raise APIError(404, f"no video with id {job_id!r}", "video_id", "not_found")
    return job


@router.post("/videos", response_model=VideoObject, openapi_extra=json_body_spec(VideoCreateBody))
async def create_video(request: Request, rt: EngineRuntimeDep, owner: OwnerDep) -> VideoObject:
    body, upload = await read_body(request, VideoCreateBody, image_body_rules(
        request, rt.engine.model.family.image != "none", "input_reference"))
    model = rt.engine.model
    if body.model is not None and body.model not in (model.name, "microverse", *model.adapters):
        served = ", ".join([model.name, *model.adapters])
        raise APIError(400, f"model {body.model!r} is not served here; this server serves {served}",
                       "model", "model_not_found")
    if body.model in model.adapters and body.lora not in (None, body.model):
        raise APIError(400, f"model {body.model!r} is an adapter and lora names another ({body.lora!r})", "lora",
                       "invalid_value")
    adapter = body.model if body.model in model.adapters else None
    try:
        req = to_generate_request(body, model.defaults_for(body.lora or adapter).fps, rt.settings.max_frames, adapter)
        spec = resolve(req, model.defaults_for(req.lora), rt.limits)
        image = reference_bytes(upload, body.reference_data_url(), "input_reference")
        spec = await run_in_threadpool(attach_reference, spec, model.family, image, "input_reference",
                                       rt.settings.reference_store)
    except InputError as exc:
        raise APIError(400, exc.message, exc.param, "invalid_value") from exc
    return to_video_object(submit(rt, spec, "api", owner))


@router.get("/videos/{video_id}", response_model=VideoObject)
async def retrieve_video(video_id: str, rt: RuntimeDep, owner: OwnerDep) -> JSONResponse:
    obj = to_video_object(job_or_404(rt, video_id, owner))
    return JSONResponse(obj.model_dump(mode="json"), headers={"openai-poll-after-ms": str(POLL_AFTER_MS)})


@router.get("/videos", response_model=None)
async def list_videos(rt: RuntimeDep, owner: OwnerDep, after: str | None = None,
                      limit: int = Query(20, ge=1, le=100),
                      order: Literal["asc", "desc"] = "desc") -> dict[str, Any]:
    try:
        jobs = rt.store.list(limit=limit + 1, after=after, order=order, owner=owner)
    except KeyError:
        raise APIError(400, f"after={after!r} is not a known video id", "after", "invalid_value") from None
    page = listed(jobs[:limit])
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(jobs) > limit}


def listed(jobs: list[Job]) -> list[dict[str, Any]]:
    """The jobs as video objects; a row that cannot be rendered is logged and left out, so that one bad row never
    turns the list into a 500 for every caller."""
    page = []
    for job in jobs:
        try:
            page.append(to_video_object(job).model_dump(mode="json"))
        except (ValueError, TypeError, ArithmeticError) as exc:  # a value of the wrong kind (pydantic's errors too)
            logger.error("video %s cannot be rendered and is left out of the list: %s", job.id, exc)
    return page


@router.delete("/videos/{video_id}", response_model=None)
async def delete_video(video_id: str, rt: RuntimeDep, owner: OwnerDep) -> dict[str, Any]:
    job = job_or_404(rt, video_id, owner)
    rt.store.delete(job.id)
    if rt.worker is not None:
        rt.worker.cancel(job.id)
    return {"id": job.id, "object": "video.deleted", "deleted": True}


@router.get("/videos/{video_id}/content")
async def download_content(video_id: str, rt: RuntimeDep, owner: OwnerDep,
                           variant: Literal["video", "thumbnail", "spritesheet"] = "video") -> Response:
    job = job_or_404(rt, video_id, owner)
    if job.status != "completed":
        raise APIError(409, f"video {job.id} is {job.status}; content is available once it is completed",
                       "video_id", "video_not_ready")
    if variant == "spritesheet":
        raise APIError(400, "variant=spritesheet is not supported; use video or thumbnail", "variant", "unsupported")
    suffix, media_type = (".mp4", "video/mp4") if variant == "video" else (".webp", "image/webp")
    store = rt.store
    if not await run_in_threadpool(store.has_file, job.id, suffix):
        raise APIError(404, f"the files of video {job.id} are gone (expired or deleted)", "video_id", "not_found")
    if not store.remote:
        return FileResponse(store.video_path(job.id).with_suffix(suffix), media_type=media_type,
                            filename=f"{job.id}{suffix}")  # fmt: skip
    if rt.settings.storage_redirect:
        return RedirectResponse(await run_in_threadpool(store.signed_url, job.id, suffix), status_code=307)
    disposition = {"Content-Disposition": f'attachment; filename="{job.id}{suffix}"'}
    return StreamingResponse(iterate_in_threadpool(store.stream_file(job.id, suffix)), media_type=media_type,
                             headers=disposition)  # fmt: skip
