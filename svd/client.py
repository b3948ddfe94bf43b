"""Moved to svd/tools/client.py; `from svd.client import SyncHTTPClient` still works."""

from svd.tools.client import SyncHTTPClient

__all__ = ["SyncHTTPClient"]
