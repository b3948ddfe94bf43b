"""Frame interpolation: which ffmpeg mode makes the missing frames of a pan best, and at what cost.

A slow pan across a real photo is rendered at k times the frame rate; every k-th
frame is kept (the clip the model would make) and interpolated back to k times the
rate. The frames in between were held out, so they are the truth the interpolated
ones are scored against (PSNR), as in frame-interpolation papers.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.encoding import FPS, pan_frames, psnr
from bench.report import Row, Section
from svd.media.interpolate import MINTERPOLATE, interpolate

MODES = {
    "dup (repeat the frame before, the floor)": "format=yuv444p,minterpolate=fps={fps}:mi_mode=dup",
    "blend (cross-fade)": "format=yuv444p,minterpolate=fps={fps}:mi_mode=blend",
    "mci (motion-compensated, the service's)": MINTERPOLATE,
}


def run(photo: Path, width: int, height: int, frames: int, factors: list[int]) -> Section:
    section = Section("interpolation")
    for factor in factors:
        truth = pan_frames(photo, width, height, (frames - 1) * factor + 1)
        kept = truth[::factor]
        held_out = [index for index in range(len(truth)) if index % factor]
        video_seconds = len(truth) / (FPS * factor)
        for name, mode in MODES.items():
            start = time.perf_counter()
            made = interpolate(kept, FPS, factor, mode)
            seconds = time.perf_counter() - start
            score = psnr(made[held_out], truth[held_out])
            per_second = seconds / video_seconds
            section.data[f"x{factor} {name}"] = {
                "held_out_psnr_db": round(score, 2),
                "seconds": round(seconds, 3),
                "seconds_per_video_second": round(per_second, 3),
            }
            section.rows.append(
                Row(
                    f"x{factor}, {frames} → {len(truth)} frames of {width}x{height}: {name}",
                    f"{score:.1f} dB on held-out frames; {seconds:.2f} s, {per_second:.2f} s per second of video",
                )
            )
    return section
