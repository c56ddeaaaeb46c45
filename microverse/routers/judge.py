"""``POST /judge``: score a video against a MicroWorldBench task or a custom rubric (``evaluation.judge_api``)."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool

from evaluation.judge_api import JudgeRequest, JudgeResponse, JudgeService
from media.video import write_atomic

from ..deps import BodyRules, OwnerDep, RuntimeDep, owns, read_body
from ..errors import APIError, json_body_spec
from ..runtime import Runtime

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 200 * 1024 * 1024
JUDGE_BODY = BodyRules(max_bytes=MAX_UPLOAD_BYTES, upload="video", json_fields=("rubric",))
"""JSON, or multipart with a ``video`` file and the other fields (``rubric`` as JSON) as form fields."""

router = APIRouter()


def get_judge(rt: RuntimeDep) -> JudgeService:
    """The configured judge; 503 saying how to configure one otherwise."""
    if rt.judge is None:
        raise APIError(503, "no judge is configured: set MICROVERSE_JUDGE_BASE_URL, MICROVERSE_JUDGE_MODEL "
                       "and MICROVERSE_JUDGE_API_KEY (any OpenAI-compatible vision-language model)",
                       None, "judge_not_configured")
    return rt.judge


@router.post("/judge", response_model=None, openapi_extra=json_body_spec(JudgeRequest))
async def judge(request: Request, rt: RuntimeDep, owner: OwnerDep,
                service: Annotated[JudgeService, Depends(get_judge)]) -> JudgeResponse:
    """Judge a video (upload, base64, job id or public URL) against a task index or a custom rubric."""
    judge_request, upload = await read_body(request, JudgeRequest, JUDGE_BODY)
    return await run_in_threadpool(service.handle, judge_request, upload, partial(finished_video, rt, owner),
                                   MAX_UPLOAD_BYTES)


def finished_video(rt: Runtime, owner: str | None, job_id: str) -> Path | None:
    """Path of the mp4 of a completed job the caller ``owner`` may see, or None."""
    job = rt.store.get(job_id)
    if job is None or job.status != "completed" or not owns(owner, job):
        return None
    store = rt.store
    if not store.remote:
        path = store.video_path(job.id)
        return path if path.is_file() else None
    if not store.has_file(job.id, ".mp4"):
        return None
    local = rt.settings.storage_dir / "judge-cache" / f"{job.id}.mp4"  # the judge reads frames from a file
    if not local.is_file():
        local.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(local, store.read_file(job.id, ".mp4"))
    return local
