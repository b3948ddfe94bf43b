"""The BentoML Python client, with its task submission made to work.

BentoML 1.4.39 and 1.4.40's `SyncHTTPClient.<task>.submit()` closes a list of
opened files that the client never creates, so every submit fails with
AttributeError '_opened_files'. This subclass starts that list empty.
"""

from __future__ import annotations

from typing import Any

import bentoml


class SyncHTTPClient(bentoml.SyncHTTPClient):
    """`bentoml.SyncHTTPClient` whose `generate_task.submit(...)` works."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._opened_files: list[Any] = []
        super().__init__(*args, **kwargs)
