"""``GET /info``: what the service runs. BentoML itself serves ``/livez``, ``/readyz`` and ``/metrics``
(``service.py`` hooks readiness and the ``microverse_*`` metrics into them)."""

from __future__ import annotations

import logging
import re
from pathlib import PurePosixPath
from typing import Any

from fastapi import APIRouter

from ..deps import RuntimeDep

logger = logging.getLogger(__name__)

LOCAL_PATH_RE = re.compile(r"(?<![\w.~/:-])(?:~|\.{1,2})?(?:/[^\s/'\"`<>|:;,()\[\]{}]+)+/?")
"""A local path in text: ``/abs/dir/file``, ``~/dir`` or ``./dir`` (not the ``org/name`` of a Hugging Face id,
nor the path of a URL, whose slashes follow a word character or ``//``)."""

router = APIRouter()


@router.get("/info", response_model=None)
async def info(rt: RuntimeDep) -> dict[str, Any]:
    """Model source, architecture, dtype, device, attention backend, quantization, versions.

    Without ``MICROVERSE_API_KEY`` anyone may ask, so local paths (model folder, LoRA and transformer files, the
    paths in a load error) are shown by their last component only; with a key, callers hold it: full info.
    """
    return rt.info() if rt.settings.api_key is not None else redact_paths(rt.info())


def redact_paths(value: Any) -> Any:
    """``value`` (``/info``'s data) with every local path in its strings replaced by the path's last component;
    Hugging Face ids and URLs are kept."""
    if isinstance(value, str) and value.startswith(("/", "~")):  # a whole path, spaces and all
        return PurePosixPath(value).name or value
    if isinstance(value, str):
        return LOCAL_PATH_RE.sub(lambda m: PurePosixPath(m.group()).name or m.group(), value)
    if isinstance(value, dict):
        return {key: redact_paths(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_paths(item) for item in value]
    return value
