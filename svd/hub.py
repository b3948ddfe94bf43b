"""The hub model declared to BentoML, so a Bento pins its revision and bakes the weights in.

Only the service imports this: the generation core runs without BentoML.
"""

from __future__ import annotations

import re

import attrs
from bentoml.models import HuggingFaceModel

from svd.config import Settings
from svd.loading import FP16_FILES, explained_failures, resolve_device


@attrs.define(unsafe_hash=True)
class HubModel(HuggingFaceModel):
    """The hub model as BentoML downloads it before the service starts, failing as clearly as the loader."""

    def resolve(self, base_path: str | None = None) -> str:
        settings = Settings.from_env()
        # Before a download of many GB: refuse at once when there is nothing to run it on.
        resolve_device(settings)
        with explained_failures(settings):
            return super().resolve(base_path)


def hub_reference(settings: Settings) -> HubModel | None:
    """The hub model as a BentoML model, so a Bento pins its revision and bakes the weights in."""
    if not settings.is_hub_model:
        return None
    model = HubModel(settings.model_id, revision=settings.revision, include=FP16_FILES)
    if re.fullmatch(r"[0-9a-f]{40}", settings.revision):
        # A commit hash needs no lookup, so `bentoml build` works offline.
        object.__setattr__(model, "commit_hash", settings.revision)
    return model
