"""S3 object store (AWS S3, MinIO, Ceph RGW; moto's server in tests): the production backend.

boto3 does the hard parts (multipart upload with bounded buffers, retries, signing, the
credential chain). One client per store is shared by all threads: boto3 clients are
thread-safe, sessions are not, so the one session is only touched under a lock.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO
from urllib.parse import urlencode

import boto3
import boto3.exceptions
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from storage.base import ObjectInfo, ObjectNotFound, StoreUnavailable

DEFAULT_REGION = "us-east-1"
# A store that accepts no connection for 5 s, or sends nothing for 30 s, is unavailable: the
# caller gets 503 / DIMSE out-of-resources after the first try and `retries` more, rather than
# minutes later. The storage URL may set each (`?connect_timeout=1&read_timeout=2&retries=1`).
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 30.0
DEFAULT_RETRIES = 5

# Objects above 16 MiB go up in 8 MiB parts, at most 4 in flight: a put holds at most
# ~32 MiB of a stream in memory however big the object is.
_TRANSFER = TransferConfig(
    multipart_threshold=16 * 1024 * 1024,
    multipart_chunksize=8 * 1024 * 1024,
    max_concurrency=4,
    use_threads=True,
)
# Not a TransferConfig argument, but s3transfer honours it: the default (10) lets a slow S3
# pile up 80 MiB of read-ahead per put.
_TRANSFER.max_in_memory_upload_chunks = 4

# boto3 sessions are not thread-safe, but building a client from a fresh session reloads the
# service model (~60 ms); one shared session under a lock makes a new store ~5 ms.
_SESSION_LOCK = threading.Lock()
_SESSION: boto3.session.Session | None = None


def _new_client(region: str | None, **kwargs: Any) -> tuple[Any, str]:
    """A client and the region it uses: the caller's, else the usual chain's, else a default."""
    global _SESSION
    with _SESSION_LOCK:
        if _SESSION is None:
            _SESSION = boto3.session.Session()
        region = region or _SESSION.region_name or DEFAULT_REGION
        return _SESSION.client("s3", region_name=region, **kwargs), region


_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
# The store answers, but not for this bucket or these credentials: every request will fail alike
# until the operator fixes the URL or the credentials, so the caller hears "unavailable" (503),
# not a crash, and the code says which.
_REFUSED_CODES = frozenset(
    {
        "NoSuchBucket",
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "PermanentRedirect",
        "AuthorizationHeaderMalformed",
    }
)
_NETWORK_ERRORS = (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)
# S3 answers a HEAD of an object in a bucket that does not exist with a bare 404, as for a missing
# object: only a HEAD of the bucket tells them apart. Its answer is kept this long, so that a burst
# of misses (a verify, a viewer asking for many instances) costs one more request, not one each.
_BUCKET_CHECK_SECONDS = 5.0


class _CountingReader:
    """Counts the bytes a non-seekable stream yields, so put() can report the size without a HEAD."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        chunk = self._raw.read(n)
        self.count += len(chunk)
        return chunk


def _timestamp(response: dict[str, Any]) -> float | None:
    when = response.get("LastModified")
    return when.timestamp() if when is not None else None


def _error_code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _store_side(exc: botocore.exceptions.ClientError) -> bool:
    """An error of the store's own (5xx: InternalError, ServiceUnavailable, SlowDown...), after
    botocore's retries: the caller may try again, as when the store is unreachable."""
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return int(status) >= 500 or _error_code(exc) in ("SlowDown", "RequestTimeout", "ServiceUnavailable")


class S3Store:
    list_page_size = 1000  # S3's maximum; tests lower it to exercise paging cheaply

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        create_bucket: bool = False,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        if not bucket:
            raise ValueError("an S3 storage URL needs a bucket: s3://bucket[/prefix]")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        config = Config(
            retries={"max_attempts": retries, "mode": "standard"},
            # botocore's 60 s defaults, times its attempts, would hold every request of a stalled
            # store for minutes (and with it the request's thread and the client's patience).
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # Ingest and retrieve run many threads on the one client; the default pool is 10.
            max_pool_connections=32,
            # S3-compatible servers (MinIO, Ceph, moto) are addressed by path, not virtual host,
            # and not all of them understand the newer default request checksums.
            s3={"addressing_style": "path"} if endpoint_url else {},
            request_checksum_calculation="when_required" if endpoint_url else "when_supported",
            response_checksum_validation="when_required" if endpoint_url else "when_supported",
        )
        self._client, self.region = _new_client(region, endpoint_url=endpoint_url, config=config)
        # (when the bucket was last checked, whether it was missing): see _bucket_missing.
        self._bucket_checked: tuple[float, bool] | None = None
        query = {k: v for k, v in (("endpoint_url", endpoint_url), ("region", region)) if v}
        path = f"/{self.prefix}" if self.prefix else ""
        self.url = f"s3://{bucket}{path}" + (f"?{urlencode(query)}" if query else "")
        if create_bucket:
            self._ensure_bucket()

    # -- helpers ---------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        # Keys come from validated UIDs; refusing odd ones keeps the prefix a real boundary.
        if not key or key.startswith("/") or any(part in ("", ".", "..") for part in key.split("/")):
            raise ValueError("invalid object key")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _strip(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    def _no_bucket(self) -> StoreUnavailable:
        return StoreUnavailable(
            f"object store refused: NoSuchBucket (the bucket {self.bucket} does not exist): "
            "the storage URL names a bucket that was never created or has been deleted"
        )

    def _bucket_missing(self) -> bool:
        """Whether the bucket is gone, asked only once an object was not found (and answered from
        the last check for _BUCKET_CHECK_SECONDS). An answer that is not "no such bucket" (access
        to the bucket denied, say) leaves the object's 404 as it was: the object's own HEAD was
        allowed, so the bucket is there."""
        now = time.monotonic()
        checked = self._bucket_checked
        if checked is not None and now - checked[0] < _BUCKET_CHECK_SECONDS:
            return checked[1]
        try:
            self._client.head_bucket(Bucket=self.bucket)
            missing = False
        except botocore.exceptions.ClientError as exc:
            if _store_side(exc):
                raise StoreUnavailable(f"object store error: {_error_code(exc) or 'HTTP 5xx'}") from exc
            missing = _error_code(exc) in ("404", "NoSuchBucket", "NotFound")
        except _NETWORK_ERRORS as exc:
            raise StoreUnavailable(f"object store unreachable: {type(exc).__name__}") from exc
        self._bucket_checked = (now, missing)
        return missing

    def _call(self, key: str | None, method: str, **kwargs: Any) -> Any:
        try:
            return getattr(self._client, method)(**kwargs)
        except botocore.exceptions.ClientError as exc:
            code = _error_code(exc)
            if key is not None and code in _NOT_FOUND_CODES:
                # NoSuchKey names the object; a bare 404 (every HEAD) may mean the bucket is gone,
                # which the operator must hear as "store unavailable", not as studies missing.
                if code != "NoSuchKey" and self._bucket_missing():
                    raise self._no_bucket() from exc
                raise ObjectNotFound(key) from exc
            if _store_side(exc):
                raise StoreUnavailable(f"object store error: {code or 'HTTP 5xx'}") from exc
            if code == "NoSuchBucket":
                raise self._no_bucket() from exc
            if code in _REFUSED_CODES:
                raise StoreUnavailable(f"object store refused: {code}") from exc
            raise
        except boto3.exceptions.S3UploadFailedError as exc:
            # s3transfer wraps whatever failed an upload (a part refused, a 5xx) into this one type;
            # the multipart upload was aborted, so nothing is stored and the caller may retry.
            raise StoreUnavailable("object store refused the upload") from exc
        except _NETWORK_ERRORS as exc:
            raise StoreUnavailable(f"object store unreachable: {type(exc).__name__}") from exc

    def _ensure_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except botocore.exceptions.ClientError as exc:
            if _error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise
        except _NETWORK_ERRORS as exc:
            raise StoreUnavailable(f"object store unreachable: {type(exc).__name__}") from exc
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":  # us-east-1 refuses an explicit LocationConstraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(**kwargs)
        except botocore.exceptions.ClientError as exc:
            # Another node created it between our HEAD and our PUT.
            if _error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    # -- ObjectStore -----------------------------------------------------------------------

    def put(self, key: str, data: BinaryIO, *, size: int | None = None) -> ObjectInfo:
        """Stream `data` to the object; S3 makes it visible only once complete (atomic).

        A failed multipart upload is aborted by boto3, so nothing partial is left behind.
        """
        full = self._key(key)
        seekable = getattr(data, "seekable", lambda: False)()
        source: Any
        if seekable:
            start = data.tell()
            total = data.seek(0, os.SEEK_END) - start
            data.seek(start)
            source = data
        else:
            source = _CountingReader(data)
        self._call(None, "upload_fileobj", Fileobj=source, Bucket=self.bucket, Key=full, Config=_TRANSFER)
        if not seekable:
            total = source.count
        return ObjectInfo(key=key, size=total)

    def put_file(self, key: str, path: str, *, move: bool = False) -> ObjectInfo:
        full = self._key(key)
        size = os.path.getsize(path)
        self._call(None, "upload_file", Filename=path, Bucket=self.bucket, Key=full, Config=_TRANSFER)
        return ObjectInfo(key=key, size=size)

    def get(
        self, key: str, *, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20
    ) -> Iterator[bytes]:
        """Yield the bytes [start, end) of the object; end None means to its end.

        The request is made here, not on first iteration, so a missing key raises
        ObjectNotFound before a caller has committed to a response.
        """
        if start < 0 or (end is not None and end < 0):
            raise ValueError("byte range must not be negative")
        full = self._key(key)
        if end is not None and end <= start:
            self.head(key)  # an empty range of a missing object is still "not found"
            return iter(())
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": full}
        if start or end is not None:
            # HTTP ranges are inclusive; ours is half-open like a slice.
            kwargs["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            response = self._call(key, "get_object", **kwargs)
        except botocore.exceptions.ClientError as exc:
            if _error_code(exc) == "InvalidRange":  # start at or beyond the end: nothing to read
                return iter(())
            raise
        return self._iter(response["Body"], chunk_size)

    @staticmethod
    def _iter(body: Any, chunk_size: int) -> Iterator[bytes]:
        try:
            yield from body.iter_chunks(chunk_size)
        except botocore.exceptions.BotoCoreError as exc:
            raise StoreUnavailable(f"object store read failed: {type(exc).__name__}") from exc
        finally:
            body.close()  # frees the connection even when the reader stops early

    def open_local(self, key: str) -> str | None:
        return None

    def head(self, key: str) -> ObjectInfo:
        response = self._call(key, "head_object", Bucket=self.bucket, Key=self._key(key))
        return ObjectInfo(key=key, size=int(response["ContentLength"]), modified=_timestamp(response))

    def delete(self, key: str) -> None:
        # S3 deletes are idempotent: deleting a missing key succeeds, as in LocalStore.
        self._call(None, "delete_object", Bucket=self.bucket, Key=self._key(key))

    def list(self, prefix: str = "") -> Iterable[ObjectInfo]:
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(
                Bucket=self.bucket, Prefix=full_prefix, PaginationConfig={"PageSize": self.list_page_size}
            ):
                for obj in page.get("Contents", ()):
                    yield ObjectInfo(
                        key=self._strip(obj["Key"]), size=int(obj["Size"]), modified=_timestamp(obj)
                    )
        except botocore.exceptions.ClientError as exc:
            if _error_code(exc) == "NoSuchBucket":
                raise self._no_bucket() from exc
            if _store_side(exc) or _error_code(exc) in _REFUSED_CODES:
                raise StoreUnavailable(f"object store refused: {_error_code(exc) or 'HTTP 5xx'}") from exc
            raise
        except _NETWORK_ERRORS as exc:
            raise StoreUnavailable(f"object store unreachable: {type(exc).__name__}") from exc
