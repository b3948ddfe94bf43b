"""The S3 backend of svd/storage/storage.py: SVD_OUTPUT_DIR=s3://bucket/prefix, on AWS S3, MinIO,
Cloudflare R2 or GCS's XML API, through boto3.

boto3 finds the credentials and the endpoint itself, as every AWS tool does: AWS_ACCESS_KEY_ID
and AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for a store other than AWS, AWS_REGION, or the
instance's role. They are never logged: errors name the bucket and prefix only.

A PUT is atomic in S3 (a large upload's parts become visible at once, when it completes), so a
reader never sees half an object. Every request has connect and read deadlines and is retried
with exponential backoff on throttling and transient faults (botocore's standard retry mode),
so an operation ends within ATTEMPTS times its deadlines.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from svd.storage.storage import BUCKET_SCHEME, Download, Entry, StorageFull, StorageUnavailable

logger = logging.getLogger(f"bentoml.{__name__}")

CONNECT_SECONDS = 5
READ_SECONDS = 30
ATTEMPTS = 4
CHUNK_BYTES = 256 * 1024
# Error codes stores answer when a bucket or account is out of space or quota (MinIO, Ceph, R2).
FULL_CODES = ("XMinioStorageFull", "QuotaExceeded", "StorageFull", "InsufficientStorage", "507")
MISSING_CODES = ("NoSuchKey", "404", "NotFound")


def _entry(name: str, size: int, modified: datetime, etag: str) -> Entry:
    # S3 times are to the second; the ETag changes with every write.
    return Entry(name, size, modified.timestamp(), etag.strip('"'))


class _Client:
    """One boto3 client for a bucket and all its prefixes, made at first use: the process that
    only imports the service never loads boto3."""

    def __init__(self, region: str = "") -> None:
        self.region = region
        self._client: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                self._client = boto3.session.Session().client(
                    "s3",
                    region_name=self.region or None,
                    config=Config(
                        # Version 4: the one every S3-compatible store accepts, and presigned links expire by it.
                        signature_version="s3v4",
                        connect_timeout=CONNECT_SECONDS,
                        read_timeout=READ_SECONDS,
                        retries={"max_attempts": ATTEMPTS, "mode": "standard"},
                    ),
                )
            return self._client


class Bucket:
    """Objects under `prefix` (empty, or ending in /) in an S3 bucket."""

    def __init__(self, bucket: str, prefix: str, client: _Client | None = None):
        self.bucket = bucket
        self.prefix = prefix
        self.where = f"{BUCKET_SCHEME}{bucket}/{prefix}"
        self._client = client or _Client()

    @classmethod
    def at(cls, location: str, region: str = "") -> Bucket:
        """The bucket and prefix of s3://bucket/prefix."""
        bucket, _, prefix = location.removeprefix(BUCKET_SCHEME).partition("/")
        prefix = prefix.strip("/")
        return cls(bucket, f"{prefix}/" if prefix else "", _Client(region))

    def write(self, name: str, content: Path | bytes) -> None:
        key = self.prefix + name
        if isinstance(content, bytes):
            self._call("write", name, "put_object", Bucket=self.bucket, Key=key, Body=content)
        else:
            # Multipart beyond 8 MiB, completed only once every part is in.
            self._call("write", name, "upload_file", str(content), self.bucket, key)

    def read(self, name: str, limit: int) -> bytes | None:
        answer = self._call("read", name, "get_object", Bucket=self.bucket, Key=self.prefix + name)
        if answer is None:
            return None
        with answer["Body"] as body:
            return self._guard("read", name, body.read, limit)

    def fetch(self, name: str) -> Download | None:
        answer = self._call("read", name, "get_object", Bucket=self.bucket, Key=self.prefix + name)
        if answer is None:
            return None
        body = answer["Body"]
        return Download(answer["ContentLength"], body.iter_chunks(CHUNK_BYTES), body.close)

    def stat(self, name: str) -> Entry | None:
        answer = self._call("read", name, "head_object", Bucket=self.bucket, Key=self.prefix + name)
        if answer is None:
            return None
        return _entry(name, answer["ContentLength"], answer["LastModified"], answer["ETag"])

    def list(self) -> list[Entry]:
        def listing() -> list[Entry]:
            pages = self._client.get().get_paginator("list_objects_v2")
            # The delimiter keeps the sub-folders' objects (previews/) out of the listing.
            return [
                _entry(item["Key"][len(self.prefix) :], item["Size"], item["LastModified"], item["ETag"])
                for page in pages.paginate(Bucket=self.bucket, Prefix=self.prefix, Delimiter="/")
                for item in page.get("Contents", ())
            ]

        return self._guard("list", "", listing)

    def delete(self, name: str) -> None:
        self._call("delete", name, "delete_object", Bucket=self.bucket, Key=self.prefix + name)

    def move(self, name: str, target: str) -> None:
        # S3 has no rename: a copy replaces the target object whole, then the source goes.
        source = {"Bucket": self.bucket, "Key": self.prefix + name}
        self._call("move", name, "copy_object", Bucket=self.bucket, Key=self.prefix + target, CopySource=source)
        self.delete(name)

    def link(self, name: str, seconds: int) -> str:
        # Signed here, without a request: it cannot fail for the store being unreachable.
        return self._client.get().generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.prefix + name}, ExpiresIn=seconds
        )

    def child(self, name: str) -> Bucket:
        return Bucket(self.bucket, f"{self.prefix}{name}/", self._client)

    def _call(self, doing: str, name: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """The client's answer to `method`, None for a missing object."""
        return self._guard(doing, name, lambda: getattr(self._client.get(), method)(*args, **kwargs))

    def _guard(self, doing: str, name: str, step: Any, *args: Any) -> Any:
        """`step`'s answer, with boto3's errors as StorageFull or StorageUnavailable naming the bucket."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return step(*args)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in MISSING_CODES:
                return None
            failure = f"{code}: {error.get('Message') or 'no message'}"
        except S3UploadFailedError as exc:
            # boto3's upload says the store's error code only in its message.
            failure = str(exc)
            code = next((full for full in FULL_CODES if full in failure), "")
        except (BotoCoreError, OSError) as exc:
            raise StorageUnavailable(
                f"the output store {self.where} could not be reached to {doing} {name or 'its listing'}: {exc}"
            ) from None
        if code in FULL_CODES:
            raise StorageFull(f"the output store {self.where} is full: {failure}")
        raise StorageUnavailable(f"the output store {self.where} refused to {doing} {name or 'its listing'}: {failure}")
