"""The ids this service hands out: outputs, jobs and webhook deliveries share one form,
checked by every route before an id reaches a file system or a store."""

from __future__ import annotations

import re
import secrets

# 128 random bits, as hex: the ids this service hands out, BentoML's task ids included.
ID = re.compile(r"[0-9a-f]{32}")


def new_id() -> str:
    return secrets.token_hex(16)
