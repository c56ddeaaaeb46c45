"""Captions from a vision-language model behind an OpenAI-compatible chat API (``openai`` client)."""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

import cv2

from media.video import sample_frames

logger = logging.getLogger(__name__)


class Captioner:
    """Sends a few JPEG frames of a clip with an instruction; returns the model's caption."""

    def __init__(self, model: str, base_url: str | None, instruction: str, num_frames: int = 4, max_tokens: int = 120):
        from openai import OpenAI

        # Local servers (vLLM, SGLang) accept any key; OPENAI_BASE_URL applies when base_url is None.
        self.client = OpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"))
        self.model, self.instruction, self.num_frames, self.max_tokens = model, instruction, num_frames, max_tokens

    def caption(self, path: str | Path) -> str:
        images = []
        for frame in sample_frames(path, self.num_frames):
            _ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            url = "data:image/jpeg;base64," + base64.b64encode(jpeg.tobytes()).decode()
            images.append({"type": "image_url", "image_url": {"url": url}})
        response = self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": [{"type": "text", "text": self.instruction}, *images]}],
            max_tokens=self.max_tokens,
            temperature=0.2,
        )
        text = (response.choices[0].message.content or "").strip()
        if not text:
            raise ValueError(f"empty caption for {path}")
        return text
