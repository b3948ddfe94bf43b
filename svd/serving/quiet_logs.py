"""Library log records that say nothing to an operator of this service: warnings filtered by
their exact text, and BentoML's tracebacks for requests it refuses.

Each filter sits on the one logger that emits its records, so every other record of
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


# BentoML logs "Exception on <path> [<method>]" with a traceback for every request whose
# input fails validation, which it answers 400 with the reason: a fuzzer's few hundred requests
# wrote hundreds. The access log's line, with the status, is the one line such a request needs.
REFUSALS_LOGGER = "bentoml._internal.server.http_app"


class _DropRefusals(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        from bentoml.exceptions import BentoMLException
        from pydantic import ValidationError

        exc = record.exc_info[1] if record.exc_info else None
        return not (
            isinstance(exc, ValidationError) or (isinstance(exc, BentoMLException) and exc.error_code.value < 500)
        )


def quiet_library_noise() -> None:
    """Install the filters; idempotent."""
    for name, text in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _Drop) for existing in logger.filters):
            logger.addFilter(_Drop(text))
    refusals = logging.getLogger(REFUSALS_LOGGER)
    if not any(isinstance(existing, _DropRefusals) for existing in refusals.filters):
        refusals.addFilter(_DropRefusals())
