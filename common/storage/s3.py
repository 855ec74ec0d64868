"""S3-compatible object storage through boto3 (AWS S3, MinIO, SeaweedFS, Ceph, ...).

Endpoint, region and credentials come from lipfarm's settings or, where those are unset, from the
usual AWS environment variables and config files (boto3's own chain). Files go through boto3's
transfer manager: multipart uploads and ranged parallel downloads for large files. Every failure a
user can fix is turned into a ``ServiceError`` naming the bucket and the endpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from lipfarm.common.errors import NotFoundError, ServiceError
from lipfarm.common.fileio import replaced_atomically
from lipfarm.common.storage.base import Storage

_MULTIPART_THRESHOLD = 16 * 1024 * 1024
_PRESIGN_EXPIRES_S = 7 * 24 * 3600


class S3Storage(Storage):
    """Storage in an S3 bucket, optionally under a key prefix."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None, access_key: str | None = None,
                 secret_key: str | None = None) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if not bucket:
            raise ServiceError("S3 storage URL names no bucket (expected s3://bucket[/prefix])")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        config = Config(retries={"max_attempts": 4, "mode": "standard"}, connect_timeout=5,
                        read_timeout=60, signature_version="s3v4",
                        s3={"addressing_style": "path" if endpoint_url else "auto"})
        session = boto3.session.Session(aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                                        region_name=region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
        self.client = session.client("s3", endpoint_url=endpoint_url, config=config)
        self.transfer = TransferConfig(multipart_threshold=_MULTIPART_THRESHOLD,
                                       multipart_chunksize=_MULTIPART_THRESHOLD, max_concurrency=4)

    @property
    def _where(self) -> str:
        return f"bucket '{self.bucket}' at {self.endpoint_url or 'AWS S3'}"

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, exc: Exception, key: str | None = None) -> Exception:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        if isinstance(exc, EndpointConnectionError):
            return ServiceError(f"cannot reach the S3 endpoint {self.endpoint_url or 'AWS S3'} "
                                f"for {self._where}")
        if isinstance(exc, NoCredentialsError):
            return ServiceError(f"no S3 credentials for {self._where} (set AWS_ACCESS_KEY_ID and "
                                "AWS_SECRET_ACCESS_KEY or LIPFARM_S3_* settings)")
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound") and key is not None:
                return NotFoundError(f"no object '{key}' in {self._where}")
            if code in ("NoSuchBucket", "404", "NotFound"):  # head_bucket says 404 for a missing bucket
                return ServiceError(f"{self._where} does not exist")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
                        "InvalidToken", "ExpiredToken"):
                return ServiceError(f"S3 refused the credentials for {self._where} ({code})")
            return ServiceError(f"S3 error on {self._object(key)}: {code or exc}")
        return ServiceError(f"S3 error on {self._object(key)}: {exc}")

    def _object(self, key: str | None) -> str:
        return f"'{key}' in {self._where}" if key else self._where

    def _call(self, key: str | None, method, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return method(*args, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise self._error(exc, key) from None

    def put_file(self, key: str, path: Path) -> None:
        self._call(key, self.client.upload_file, str(path), self.bucket, self._key(key),
                   Config=self.transfer)

    def get_file(self, key: str, path: Path) -> None:
        with replaced_atomically(path) as temp:
            self._call(key, self.client.download_file, self.bucket, self._key(key), str(temp),
                       Config=self.transfer)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(key, self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_bytes(self, key: str) -> bytes:
        response = self._call(key, self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        return response["Body"].read()

    def read_range(self, key: str, start: int, stop: int) -> bytes:
        if stop <= start:
            return b""
        response = self._call(key, self.client.get_object, Bucket=self.bucket, Key=self._key(key),
                              Range=f"bytes={start}-{stop - 1}")
        return response["Body"].read()

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
            return True
        except NotFoundError:
            return False

    def size(self, key: str) -> int:
        response = self._call(key, self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        return int(response["ContentLength"])

    def list(self, prefix: str) -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        skip = len(self.prefix) + 1 if self.prefix else 0
        pages = self._call(None, lambda: list(paginator.paginate(Bucket=self.bucket,
                                                                 Prefix=self._key(prefix))))
        for page in pages:
            for item in page.get("Contents", []):
                yield item["Key"][skip:]

    def delete(self, key: str) -> None:
        self._call(key, self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def check(self) -> None:
        self._call(None, self.client.head_bucket, Bucket=self.bucket)

    def location(self, key: str) -> str:
        return self._call(key, self.client.generate_presigned_url, "get_object",
                          Params={"Bucket": self.bucket, "Key": self._key(key)},
                          ExpiresIn=_PRESIGN_EXPIRES_S)
