"""The storage SVD_OUTPUT_DIR names, a bucket or a folder (svd/storage/storage.py)."""

from __future__ import annotations

from pathlib import Path

from svd.storage.storage import BUCKET_SCHEME, Storage


def storage_at(location: str, region: str = "") -> Storage:
    """The storage SVD_OUTPUT_DIR names: s3://bucket/prefix (in `region`, empty: boto3 finds it), or a
    folder (created if missing)."""
    if location.startswith(BUCKET_SCHEME):
        # Imported here: boto3 takes a moment and memory that a local folder never needs.
        from svd.storage.bucket import Bucket

        return Bucket.at(location, region)
    from svd.storage.folder import Folder

    return Folder(Path(location))
