"""The playground at ``/ui``: one self-contained page (``static/ui.html``) driving ``/v1/videos`` and ``/judge``."""

from __future__ import annotations

import logging
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

logger = logging.getLogger(__name__)

UI_PAGE = resources.files("microverse") / "static" / "ui.html"

router = APIRouter()


@router.get("/ui", response_class=HTMLResponse, include_in_schema=False)
async def playground() -> HTMLResponse:
    """The playground page (inline CSS and JS; no external resources)."""
    return HTMLResponse(UI_PAGE.read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})
