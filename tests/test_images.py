"""Image preparation: photos as users really send them become upright 8-bit RGB of the asked size."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness import PHOTO
from svd.base.errors import BadInput, TooLarge, UnsupportedImage
from svd.media.images import fit, open_image, prepare_image, to_rgb

MAX_PIXELS = 40_000_000


def save(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def gradient(width: int = 160, height: int = 96) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)
    return Image.fromarray(np.stack([np.tile(x, (height, 1))] * 3, axis=-1), "RGB")


def test_exif_orientation_is_applied(tmp_path: Path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display", as phones write it
    path = save(gradient(160, 96), tmp_path / "phone.jpg", exif=exif.tobytes())
    upright = to_rgb(open_image(path, MAX_PIXELS))
    assert upright.size == (96, 160)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparent_pixels_become_white(tmp_path: Path, mode: str):
    image = Image.new(mode, (96, 96))  # fully transparent black
    path = save(image, tmp_path / "clear.png")
    rgb = to_rgb(open_image(path, MAX_PIXELS))
    assert rgb.mode == "RGB" and rgb.getpixel((10, 10)) == (255, 255, 255)


def test_palette_transparency_becomes_white(tmp_path: Path):
    image = Image.new("P", (96, 96), 0)
    image.putpalette([0, 0, 0, 255, 0, 0])
    path = save(image, tmp_path / "palette.png", transparency=0)
    assert to_rgb(open_image(path, MAX_PIXELS)).getpixel((5, 5)) == (255, 255, 255)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path):
    array = np.full((96, 96), 32768, dtype=np.uint16)
    path = save(Image.fromarray(array), tmp_path / "deep.png")
    rgb = to_rgb(open_image(path, MAX_PIXELS))
    assert rgb.mode == "RGB" and abs(rgb.getpixel((0, 0))[0] - 128) <= 1


def test_cmyk_and_greyscale_become_rgb(tmp_path: Path):
    cmyk = save(Image.new("CMYK", (96, 96), (0, 255, 255, 0)), tmp_path / "print.jpg")
    grey = save(Image.new("L", (96, 96), 77), tmp_path / "grey.png")
    red = to_rgb(open_image(cmyk, MAX_PIXELS)).getpixel((1, 1))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    assert to_rgb(open_image(grey, MAX_PIXELS)).getpixel((1, 1)) == (77, 77, 77)


def test_animated_images_use_their_first_frame(tmp_path: Path):
    frames = [Image.new("RGB", (96, 96), colour) for colour in [(250, 0, 0), (0, 0, 250)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    first = to_rgb(open_image(path, MAX_PIXELS)).getpixel((1, 1))
    assert first[0] > 200 and first[2] < 50


def test_sizing_stretch_crop_and_pad(tmp_path: Path):
    portrait = Image.new("RGB", (100, 200), (0, 0, 0))
    assert fit(portrait, 256, 128, "stretch").getpixel((2, 64)) == (0, 0, 0)
    assert fit(portrait, 256, 128, "pad").getpixel((2, 64)) == (255, 255, 255)  # bars beside it
    assert fit(portrait, 256, 128, "pad").getpixel((128, 64)) == (0, 0, 0)
    cropped = fit(gradient(400, 100), 128, 128, "crop")
    assert cropped.size == (128, 128)
    # Cover 400x100 with 128x128, then keep the middle: the left edge is 150/400 of the way along.
    assert 85 < cropped.getpixel((0, 64))[0] < 105


def test_prepare_gives_the_requested_size():
    assert prepare_image(PHOTO, 576, 1024, "crop", MAX_PIXELS).size == (576, 1024)


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        (b"", BadInput, "empty"),
        (b"just some text, not a picture\n", UnsupportedImage, "not an image"),
        (PHOTO.read_bytes()[:3000], BadInput, "truncated or corrupt"),
    ],
)
def test_bad_files_say_what_is_wrong(tmp_path: Path, content: bytes, error: type, message: str):
    path = tmp_path / "upload"
    path.write_bytes(content)
    with pytest.raises(error, match=message):
        prepare_image(path, 256, 128, "stretch", MAX_PIXELS)


def test_too_many_pixels_and_too_small_are_refused(tmp_path: Path):
    big = save(Image.new("L", (3000, 2000)), tmp_path / "big.png")
    with pytest.raises(TooLarge, match="6.0 megapixels.*limit is 5"):
        open_image(big, 5_000_000)
    small = save(Image.new("RGB", (63, 200)), tmp_path / "small.png")
    with pytest.raises(BadInput, match="at least 64"):
        open_image(small, MAX_PIXELS)


def test_unsupported_format_is_named(tmp_path: Path):
    buffer = io.BytesIO()
    Image.new("RGB", (96, 96)).save(buffer, format="PPM")
    path = tmp_path / "picture.ppm"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(UnsupportedImage, match="PPM.*accepted formats"):
        open_image(path, MAX_PIXELS)
