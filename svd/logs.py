"""Library warnings that say nothing to an operator of this service, filtered by their exact text.

Each filter sits on the one logger that emits its message, so every other record of
those libraries still reaches the log.
"""

from __future__ import annotations

import logging

NOISE = {
    # At every start: the CLIP image processor falls back to its PIL version, which is what runs anyway.
    "transformers.utils.import_utils": "requires torchvision (not installed); falling back to",
    # At every half-precision request: diffusers warns about modules to keep in float32, and lists none.
    "diffusers.models.modeling_utils": "that should be kept in float32: []",
}


class _Drop(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_library_noise() -> None:
    """Install the filters; idempotent."""
    for name, text in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _Drop) for existing in logger.filters):
            logger.addFilter(_Drop(text))
