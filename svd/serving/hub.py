"""The hub model declared to BentoML, so a Bento pins its revision and bakes the weights in.

Only the service imports this: the generation core runs without BentoML. It is imported
where `bentoml serve` imports service.py, so it imports no torch: the loader comes in
when the model resolves.
"""

from __future__ import annotations

import re
import threading

import attrs
from bentoml.models import HuggingFaceModel

from svd.base.settings import Settings

# Only the fp16 weights and the configs: the hub repo also holds fp32 copies and
# a single-file checkpoint that would triple the download.
FP16_FILES = ["model_index.json", "*/*.json", "*/*.txt", "*/*.fp16.safetensors"]


@attrs.define(unsafe_hash=True)
class HubModel(HuggingFaceModel):
    """The hub model as BentoML downloads it before the service starts, failing as clearly as the loader."""

    def resolve(self, base_path: str | None = None) -> str:
        from svd.core.loading import ModelLoadError, explained_failures, resolve_device

        settings = Settings.from_env()
        try:
            # Before a download of many GB: refuse at once when there is nothing to run it on.
            resolve_device(settings)
            with explained_failures(settings):
                return super().resolve(base_path)
        except ModelLoadError as exc:
            if threading.current_thread() is not threading.main_thread():
                raise  # the worker's loading thread: the engine reports it
            # `bentoml serve` resolves declared models before it starts (server_on_deployment):
            # one paragraph and a non-zero exit, not a traceback.
            raise SystemExit(f"SVD cannot start: {exc}") from None


def hub_reference(settings: Settings) -> HubModel | None:
    """The hub model as a BentoML model, so a Bento pins its revision and bakes the weights in."""
    # An api replica (SVD_ROLE=api) runs no model, so BentoML downloads none before it starts.
    if settings.role == "api" or not settings.is_hub_model:
        return None
    model = HubModel(settings.model_id, revision=settings.revision, include=FP16_FILES)
    if re.fullmatch(r"[0-9a-f]{40}", settings.revision):
        # A commit hash needs no lookup, so `bentoml build` works offline.
        object.__setattr__(model, "commit_hash", settings.revision)
    return model
