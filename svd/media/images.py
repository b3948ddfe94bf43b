"""Image preparation: whatever users upload becomes an upright RGB image of the requested size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from svd.base.errors import BadInput, TooLarge, UnsupportedImage
from svd.base.params import Sizing

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
MIN_SIDE = 64
PAD_COLOUR = (255, 255, 255)


def open_image(path: Path, max_pixels: int) -> Image.Image:
    """Open an uploaded file, refusing what is not an image before decoding it in full."""
    accepted = ", ".join(ACCEPTED_FORMATS)
    if path.stat().st_size == 0:
        raise BadInput(f"`image` is an empty file; upload a photo ({accepted}).")
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise TooLarge(f"`image` is too large to decode: {exc}") from None
    except (UnidentifiedImageError, OSError):
        raise UnsupportedImage(
            f"`image` is not an image this service can read; accepted formats: {accepted}."
        ) from None
    if image.format not in ACCEPTED_FORMATS:
        raise UnsupportedImage(f"`image` is a {image.format} image; accepted formats: {accepted}.")
    width, height = image.size
    if width * height > max_pixels:
        raise TooLarge(
            f"`image` is {width}x{height} ({width * height / 1e6:.1f} megapixels); the limit is "
            f"{max_pixels / 1e6:.0f} megapixels. Downscale it first."
        )
    if min(width, height) < MIN_SIDE:
        raise BadInput(f"`image` is {width}x{height}; both sides must be at least {MIN_SIDE} pixels.")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadInput(f"`image` is a truncated or corrupt {image.format} file ({exc}).") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB: EXIF orientation applied, transparency on white, deep and CMYK images converted."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits rather than let PIL clip at 255.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info or image.mode in ("LA", "PA"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, PAD_COLOUR)
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def fit(image: Image.Image, width: int, height: int, sizing: Sizing = "stretch") -> Image.Image:
    """Bring an RGB image to width x height: stretch it, crop it to cover, or pad it to fit."""
    if sizing == "crop":
        return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)
    if sizing == "pad":
        return ImageOps.pad(image, (width, height), Image.Resampling.LANCZOS, color=PAD_COLOUR)
    return image.resize((width, height), Image.Resampling.LANCZOS)


def prepare_image(path: Path, width: int, height: int, sizing: Sizing, max_pixels: int) -> Image.Image:
    """The uploaded file as the pipeline's conditioning image."""
    with open_image(path, max_pixels) as image:
        return fit(to_rgb(image), width, height, sizing)
