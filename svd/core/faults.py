"""Test-only fault injection: make a stage fail as CUDA would, on any device.

Set through SVD_TEST_FAULTS, items STAGE:COUNT[:KIND] separated by commas. For
example "decode:2,denoise:1" makes the next two VAE decodes and the next denoise
run out of memory; "decode:1:device_error" makes the next decode fail as an
illegal memory access does. Never set in production.

Each fault is raised from a forward pre-hook deep inside its network, so the
activations of the layers before it are really allocated when it strikes, as
they would be at a real out-of-memory.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from diffusers import StableVideoDiffusionPipeline

KINDS: dict[str, Callable[[str], Exception]] = {
    "oom": lambda stage: torch.OutOfMemoryError(f"CUDA out of memory (injected by SVD_TEST_FAULTS at {stage})"),
    "device_error": lambda stage: torch.AcceleratorError(
        f"CUDA error: an illegal memory access was encountered (injected by SVD_TEST_FAULTS at {stage})"
    ),
}


def _stage_layers(pipe: StableVideoDiffusionPipeline) -> dict[str, torch.nn.Module]:
    """Where each stage's fault strikes: past the first half of its network."""
    return {
        "encode": pipe.vae.encoder.mid_block,
        "denoise": pipe.unet.mid_block,
        "decode": pipe.vae.decoder.up_blocks[-1],
    }


class Faults:
    """How many more times each stage should fail, and how."""

    def __init__(self, pipe: StableVideoDiffusionPipeline, plan: str = ""):
        self._layers = _stage_layers(pipe)
        self._planned: dict[str, list[str]] = {}
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._lock = threading.Lock()
        for item in filter(None, (part.strip() for part in plan.split(","))):
            stage, _, rest = item.partition(":")
            count, _, kind = rest.partition(":")
            if stage not in self._layers or not count.isdigit() or (kind or "oom") not in KINDS:
                raise ValueError(
                    f"SVD_TEST_FAULTS item {item!r}: use STAGE:COUNT[:KIND] with STAGE one of "
                    f"{', '.join(self._layers)} and KIND one of {', '.join(KINDS)}"
                )
            self.inject(stage, int(count), kind or "oom")

    def inject(self, stage: str, count: int = 1, kind: str = "oom") -> None:
        with self._lock:
            self._planned.setdefault(stage, []).extend([kind] * count)
            if stage not in self._hooks:
                self._hooks[stage] = self._layers[stage].register_forward_pre_hook(lambda *_: self._strike(stage))

    def clear(self) -> None:
        """Nothing planned any more, and no hooks left in the model."""
        with self._lock:
            self._planned.clear()
            for hook in self._hooks.values():
                hook.remove()
            self._hooks.clear()

    def _strike(self, stage: str) -> None:
        with self._lock:
            planned = self._planned.get(stage)
            if not planned:
                return
            kind = planned.pop(0)
        raise KINDS[kind](stage)
