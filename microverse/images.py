"""Reference images of image-conditioned requests: checked at the edge, fitted to the request's size, stored.

A reference arrives as an upload (``input_reference`` on ``/v1/videos``, ``image`` as a multipart file on
``/generate``) or as base64 (``image`` in a JSON body, a data URL or bare base64). It must decode (PNG, JPEG,
WebP, BMP or TIFF), be at most ``MAX_IMAGE_BYTES`` and ``MAX_IMAGE_SIDE`` pixels a side; any mode is converted
to RGB (alpha composited on black, 16-bit and float scaled to 8 bits).

The fitting rule: scale the image, keeping its aspect ratio, until it covers ``width`` x ``height``, then crop
the centre (what the Wan I2V examples do with a resize and a centre crop). The fitted image is stored as PNG under
``<storage>/inputs/<sha256>.png``; the spec carries that path, so a job recovered after a crash regenerates from
the same pixels, and two requests with the same fitted image share a batch.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from .families import Family
from .schemas import GenerationSpec, InputError

logger = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 20 * 2**20
"""Largest reference image file accepted."""
MAX_IMAGE_SIDE = 8192
"""Largest width or height of a reference image, in pixels."""
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")
"""Image formats accepted."""
_DATA_URL = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,", re.ASCII)


def decode_base64(text: str, field: str) -> bytes:
    """Bytes of a data URL (``data:image/png;base64,...``) or bare base64; :class:`InputError` naming ``field``."""
    if text.strip().lower().startswith(("http://", "https://")):
        raise InputError(field, f"{field}: remote URLs are not fetched; send the image as a file or a data URL")
    payload = _DATA_URL.sub("", text.strip(), count=1)
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise InputError(field, f"{field} is larger than {MAX_IMAGE_BYTES} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(field, f"{field} is neither a data URL nor base64 of an image") from None


def reference_bytes(upload: bytes | None, text: str | None, field: str) -> bytes | None:
    """The reference image a request sends: the uploaded file, or its data URL / base64 text decoded; None when it
    sends neither. :class:`InputError` naming ``field`` when it sends both or the text does not decode."""
    if upload is not None and text is not None:
        raise InputError(field, f"send {field} once: as a file or as a data URL / base64, not both")
    return upload if upload is not None else decode_base64(text, field) if text else None


def load_reference(data: bytes, field: str):
    """The RGB ``PIL.Image`` of an uploaded or decoded reference; :class:`InputError` naming ``field``."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InputError(field, f"{field} is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise InputError(field, f"{field} is {len(data)} bytes; the limit is {MAX_IMAGE_BYTES}")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt, (w, h) = probe.format, probe.size
            if fmt not in FORMATS:
                raise InputError(field, f"{field} is a {fmt} image; send one of {', '.join(FORMATS)}")
            if not (0 < w <= MAX_IMAGE_SIDE and 0 < h <= MAX_IMAGE_SIDE):
                raise InputError(field, f"{field} is {w}x{h}; each side must be 1..{MAX_IMAGE_SIDE} pixels")
            probe.load()
            return to_rgb(probe)
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(field, f"{field} is not a decodable image ({type(exc).__name__})") from None


def to_rgb(image):
    """``image`` as 8-bit RGB: alpha composited on black, 16-bit and float modes scaled to 0..255."""
    from PIL import Image

    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(image, dtype=np.float64)
        span = values.max() - values.min()
        scaled = (values - values.min()) / span * 255 if span > 0 else np.zeros_like(values)
        image = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return image.convert("RGB")


def fit(image, width: int, height: int):
    """Scale ``image`` (keeping its aspect ratio) to cover ``width`` x ``height``, then crop the centre."""
    from PIL import Image

    scale = max(width / image.width, height / image.height)
    w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    resized = image.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (w - width) // 2, (h - height) // 2
    return resized.crop((left, top, left + width, top + height))


def store_reference(image, storage_dir: str | Path) -> str:
    """Save the fitted ``image`` as ``<storage_dir>/inputs/<sha256>.png`` (content-addressed); returns the path.
    ``storage_dir`` may be an fsspec URL (``s3://bucket/prefix``, the replicas' shared store): the returned URL is
    then readable by whichever replica runs the job."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = buf.getvalue()
    if "://" in str(storage_dir):
        import fsspec

        fs, root = fsspec.core.url_to_fs(str(storage_dir), use_listings_cache=False)
        key = f"{root.rstrip('/')}/inputs/{hashlib.sha256(data).hexdigest()}.png"
        if not fs.exists(key):
            fs.pipe_file(key, data)
        return fs.unstrip_protocol(key)
    folder = Path(storage_dir) / "inputs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(data).hexdigest()}.png"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return str(path)


def open_reference(path: str):
    """The stored reference at ``path`` (a file or fsspec URL) as an RGB ``PIL.Image``."""
    import fsspec
    from PIL import Image

    with fsspec.open(path, "rb") as f, Image.open(f) as image:
        return image.convert("RGB")


def attach_reference(spec: GenerationSpec, family: Family, data: bytes | None, field: str,
                     storage_dir: str | Path) -> GenerationSpec:  # fmt: skip
    """``spec`` with the reference image ``data`` (upload or decoded base64) checked, fitted and stored; or
    :class:`InputError` naming ``field`` when the family takes no image, needs one that is missing, or the image
    is unusable."""
    if data is None:
        if family.image == "required":
            raise InputError(field, f"this model ({family.title}) animates a reference image: send {field}")
        return spec
    if family.image == "none":
        raise InputError(field, f"this model ({family.title}) takes text only; remove {field}")
    image = fit(load_reference(data, field), spec.width, spec.height)
    return replace(spec, image=store_reference(image, storage_dir))
