"""Video encoding: our encoder (svd.media.video.VideoWriter, frames down ffmpeg's stdin) against diffusers'
export_to_video.

Both get the same frames: a slow sub-pixel pan across a real photo, so the
encoders see video-like motion rather than noise (which no encoder compresses).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from diffusers.utils import export_to_video
from PIL import Image

from bench.report import Row, Section, median
from harness import decode_video, top_level_boxes
from svd.media.video import CODECS, VideoWriter

FPS = 7
PAN_PIXELS_PER_FRAME = 3.5
MIN_PSNR = 38.0
MAX_SPEED_RATIO = 0.5


@dataclass
class Encoded:
    seconds: list[float]
    bytes: int
    psnr_db: float
    codec: str
    pix_fmt: str
    boxes: list[str]

    @property
    def median_seconds(self) -> float:
        return median(self.seconds)

    @property
    def moov_first(self) -> bool:
        return "moov" in self.boxes and "mdat" in self.boxes and self.boxes.index("moov") < self.boxes.index("mdat")

    @property
    def browser_safe(self) -> bool:
        return self.codec == "h264" and self.pix_fmt == "yuv420p" and self.moov_first

    def describe(self) -> str:
        return f"{self.codec} {self.pix_fmt}, moov {'first' if self.moov_first else 'last'}"


def pan_frames(photo: Path, width: int, height: int, count: int) -> np.ndarray:
    """`count` frames of width x height panning left to right across the photo, scaled to cover."""
    with Image.open(photo) as opened:
        image = opened.convert("RGB")
    travel = PAN_PIXELS_PER_FRAME * (count - 1)
    scale = max((width + travel) / image.width, height / image.height)
    window_w, window_h = width / scale, height / scale
    top = (image.height - window_h) / 2
    # A fractional crop box resamples every frame afresh, as a camera pan would.
    boxes = [(left, top, left + window_w, top + window_h) for left in np.arange(count) * PAN_PIXELS_PER_FRAME / scale]
    return np.stack([np.asarray(image.resize((width, height), Image.Resampling.LANCZOS, box=box)) for box in boxes])


def psnr(decoded: np.ndarray, source: np.ndarray) -> float:
    """PSNR in dB of decoded frames against the source frames, over all frames and channels."""
    if decoded.shape != source.shape:
        raise ValueError(f"decoded {decoded.shape} frames, expected {source.shape}")
    # Frame by frame in int32: the whole clip in float64 would be hundreds of MB.
    squared = sum(int(np.square(a.astype(np.int32) - b).sum()) for a, b in zip(decoded, source))
    mse = squared / source.size
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def write_ours(frames: np.ndarray, path: Path, video_format: str = "mp4") -> float:
    start = time.perf_counter()
    writer = VideoWriter(path, frames.shape[2], frames.shape[1], FPS, video_format)  # type: ignore[arg-type]
    try:
        writer.write(frames)  # as the service does, once the frames have left the GPU
    finally:
        writer.close()
    return time.perf_counter() - start


def write_diffusers(images: list[Image.Image], path: Path) -> float:
    start = time.perf_counter()
    export_to_video(images, str(path), fps=FPS)
    return time.perf_counter() - start


def probe(path: Path, seconds: list[float], source: np.ndarray) -> Encoded:
    video = decode_video(path)
    return Encoded(
        seconds, path.stat().st_size, psnr(video.frames, source), video.codec, video.pix_fmt, top_level_boxes(path)
    )


@contextmanager
def mp4_variant(preset: str, crf: int) -> Iterator[str]:
    """Register the service's mp4 codec with another preset and CRF, so VideoWriter itself is measured."""
    params = list(CODECS["mp4"].output_params)
    for flag, value in (("-preset", preset), ("-crf", str(crf))):
        if flag in params:
            params[params.index(flag) + 1] = value
        else:
            params += [flag, value]
    name = f"bench-{preset}-crf{crf}"
    CODECS[name] = replace(CODECS["mp4"], output_params=tuple(params))
    try:
        yield name
    finally:
        del CODECS[name]


def run(
    photo: Path, width: int, height: int, frames: int, repeats: int, presets: list[str], crfs: list[int]
) -> Section:
    source = pan_frames(photo, width, height, frames)
    # What the SVD pipeline hands export_to_video: a list of PIL images.
    images = [Image.fromarray(frame) for frame in source]
    section = Section("encoding", data={"frames": frames, "width": width, "height": height, "source": photo.name})
    with tempfile.TemporaryDirectory(prefix="bench-encoding-") as tmp:
        ours_path, theirs_path = Path(tmp, "ours.mp4"), Path(tmp, "theirs.mp4")
        writers = {
            "ours": lambda: write_ours(source, ours_path),
            "theirs": lambda: write_diffusers(images, theirs_path),
        }
        seconds: dict[str, list[float]] = {name: [] for name in writers}
        for repeat in range(repeats):
            # Alternate who goes first, so neither always meets a cold cache or a busy neighbour.
            for name in list(writers) if repeat % 2 == 0 else reversed(list(writers)):
                seconds[name].append(writers[name]())
        ours = probe(ours_path, seconds["ours"], source)
        theirs = probe(theirs_path, seconds["theirs"], source)
        # x264 at CRF 0 is lossless, so this is the most any yuv420p (browser-safe) encode can score.
        with mp4_variant("ultrafast", 0) as name:
            write_ours(source, Path(tmp, "lossless.mp4"), name)
        ceiling = psnr(decode_video(Path(tmp, "lossless.mp4")).frames, source)
        sweep = []
        for preset in presets:
            for crf in crfs:
                with mp4_variant(preset, crf) as name:
                    path = Path(tmp, f"{name}.mp4")
                    elapsed = [write_ours(source, path, name) for _ in range(repeats)]
                sweep.append({"preset": preset, "crf": crf, **_figures(probe(path, elapsed, source))})
    section.data.update(video_writer=_figures(ours), export_to_video=_figures(theirs), sweep=sweep)
    section.data["yuv420p_ceiling_psnr_db"] = round(ceiling, 2)

    def ratio(seconds: float) -> float:
        return seconds / theirs.median_seconds

    both = f"≤ {MAX_SPEED_RATIO}× export_to_video, ≥ {MIN_PSNR:.0f} dB"
    section.rows += [
        Row(
            f"VideoWriter mp4 seconds (median of {repeats})",
            f"{ours.median_seconds:.2f} s = {ratio(ours.median_seconds):.2f}× export_to_video",
            f"≤ {MAX_SPEED_RATIO}×",
            ratio(ours.median_seconds) <= MAX_SPEED_RATIO,
        ),
        Row(
            "VideoWriter mp4 PSNR, size",
            f"{ours.psnr_db:.1f} dB, {ours.bytes / 1024:.0f} KiB",
            f"≥ {MIN_PSNR:.0f} dB",
            ours.psnr_db >= MIN_PSNR,
        ),
        Row("VideoWriter mp4 stream", ours.describe(), "h264 yuv420p, moov first", ours.browser_safe),
        Row("yuv420p ceiling: lossless x264 PSNR", f"{ceiling:.1f} dB"),
        Row(f"export_to_video seconds (median of {repeats})", f"{theirs.median_seconds:.2f} s"),
        Row("export_to_video PSNR, size", f"{theirs.psnr_db:.1f} dB, {theirs.bytes / 1024:.0f} KiB"),
        Row("export_to_video stream", theirs.describe()),
    ]
    section.rows += [
        Row(
            f"sweep: -preset {entry['preset']} -crf {entry['crf']}",
            f"{entry['median_seconds']:.2f} s = {ratio(entry['median_seconds']):.2f}×, "
            f"{entry['psnr_db']:.1f} dB, {entry['kib']} KiB",
            both,
            ratio(entry["median_seconds"]) <= MAX_SPEED_RATIO and entry["psnr_db"] >= MIN_PSNR,
        )
        for entry in sweep
    ]
    return section


def _figures(encoded: Encoded) -> dict:
    return {
        "seconds": [round(seconds, 3) for seconds in encoded.seconds],
        "median_seconds": round(encoded.median_seconds, 3),
        "kib": round(encoded.bytes / 1024),
        "psnr_db": round(encoded.psnr_db, 2),
        "codec": encoded.codec,
        "pix_fmt": encoded.pix_fmt,
        "top_level_boxes": encoded.boxes,
        "browser_safe": encoded.browser_safe,
    }
