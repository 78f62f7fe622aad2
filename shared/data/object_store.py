"""Shard stores in S3-compatible object storage: published from a local build, verified
against the bucket's listing, read by litdata through a local cache of bounded size.

A remote store is the local layout under `s3://bucket/prefix/<name>-shards-<key>/`. Its
meta.json is uploaded last and is the completion marker: a prefix without it (an upload cut
short) is never read, only rebuilt over. Before a store is reused, every file meta.json
records must be listed with its recorded size and MD5 (the ETag of a single-part upload).

Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_DEFAULT_REGION, a profile, an instance role); the endpoint from `data.s3_endpoint`, else
AWS_ENDPOINT_URL, else AWS itself. Each request is retried a bounded number of times with
short timeouts, so an unreachable endpoint fails in seconds, naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)

ATTEMPTS = 3  # per request, the first included (botocore "standard" retry mode)
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 5, 60
META, INDEX = "meta.json", "index.json"


def is_s3(location) -> bool:
    return str(location).startswith("s3://")


@dataclass(frozen=True)
class S3Location:
    """A store directory in a bucket, with how to reach it (`endpoint`: None for boto3's
    default) and where litdata caches its chunks (`cache_dir`: None for litdata's default;
    at most `cache_size`, e.g. "25GB", None for litdata's share of the free disk)."""

    url: str
    endpoint: str | None = None
    cache_dir: str | None = None
    cache_size: str | None = None

    def __post_init__(self) -> None:
        parsed = urlparse(self.url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"{self.url!r} is not an s3://bucket/prefix location")
        if self.endpoint is not None and urlparse(self.endpoint).scheme not in ("http", "https"):
            raise ValueError(
                f"data.s3_endpoint={self.endpoint!r} must be an http(s):// URL, e.g. "
                "https://s3.eu-west-1.amazonaws.com or http://minio:9000"
            )

    def __str__(self) -> str:
        return self.url.rstrip("/")

    @property
    def bucket(self) -> str:
        return urlparse(self.url).netloc

    @property
    def prefix(self) -> str:
        return urlparse(self.url).path.strip("/")

    @property
    def name(self) -> str:
        return self.prefix.rsplit("/", 1)[-1]

    def join(self, name: str) -> S3Location:
        return replace(self, url=f"{self}/{name}")

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def storage_options(self) -> dict:
        """boto3 client arguments, for litdata's `storage_options` and our own client."""
        from botocore.config import Config

        config = Config(
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            retries={"max_attempts": ATTEMPTS, "mode": "standard"},
        )
        endpoint = self.endpoint or os.environ.get("AWS_ENDPOINT_URL")
        return {"config": config, **({"endpoint_url": endpoint} if endpoint else {})}

    def reader_options(self) -> dict:
        """`StreamingDataset` arguments that read this location through the bounded cache."""
        _register_downloader()
        return {
            "storage_options": self.storage_options(),
            "cache_dir": self.cache_dir,
            "max_cache_size": self.cache_size,
        }

    def client(self):
        import boto3

        # A new session each time: the default one keeps the first credentials it found.
        return boto3.session.Session().client("s3", **self.storage_options())

    def endpoint_url(self, client=None) -> str:
        """The endpoint requests go to (boto3 resolves AWS_ENDPOINT_URL and the region)."""
        return (client or self.client()).meta.endpoint_url


def local_folder(path, kind: str = "stores") -> Path:
    """Where files beside a store go on this machine (derived splits, a build before its
    upload): the store's own directory, or for one in a bucket a folder named like it under
    its cache directory."""
    if not isinstance(path, S3Location):
        return Path(path)
    return Path(path.cache_dir or tempfile.gettempdir()) / kind / path.name


def as_location(location) -> S3Location:
    return location if isinstance(location, S3Location) else S3Location(str(location))


@contextlib.contextmanager
def s3_errors(location: S3Location, client):
    """Turn botocore's failures into errors that name the endpoint, bucket or object and
    say what to check."""
    from botocore import exceptions as bex

    try:
        yield
    except (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ReadTimeoutError) as exc:
        raise ConnectionError(
            f"cannot reach the S3 endpoint {location.endpoint_url(client)} for {location} "
            f"({ATTEMPTS} attempts, {CONNECT_TIMEOUT_S} s connect timeout): check "
            f"data.s3_endpoint / AWS_ENDPOINT_URL and the network ({exc})"
        ) from exc
    except bex.NoCredentialsError as exc:
        raise PermissionError(
            f"no AWS credentials to read {location}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or a profile / instance role)"
        ) from exc
    except bex.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
            raise PermissionError(
                f"access denied to bucket {location.bucket!r} at "
                f"{location.endpoint_url(client)} ({code}): invalid key or secret in "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or no rights on the bucket"
            ) from exc
        if code == "NoSuchBucket":
            raise FileNotFoundError(
                f"bucket {location.bucket!r} does not exist at {location.endpoint_url(client)}"
            ) from exc
        raise OSError(
            f"the S3 endpoint {location.endpoint_url(client)} refused a request for "
            f"{location} ({code or exc}): is it an S3 API (data.s3_endpoint / AWS_ENDPOINT_URL)?"
        ) from exc


def read_meta(location: S3Location, client=None) -> dict | None:
    """The store's meta.json, or None where there is none (nothing, or an unfinished upload)."""
    client = client or location.client()
    with s3_errors(location, client):
        try:
            body = client.get_object(Bucket=location.bucket, Key=location.key(META))["Body"]
        except client.exceptions.NoSuchKey:
            return None
        return json.loads(body.read())


def listing(location: S3Location, client=None) -> dict[str, dict]:
    """Every object under the store's prefix: name -> {"size", "etag"}."""
    client = client or location.client()
    found = {}
    with s3_errors(location, client):
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=location.bucket, Prefix=location.key("")
        )
        for page in pages:
            for item in page.get("Contents", []):
                name = item["Key"][len(location.key("")) :]
                found[name] = {"size": item["Size"], "etag": item["ETag"].strip('"')}
    return found


def remote_damage(location: S3Location, meta: dict, client=None) -> str | None:
    """What is wrong with the published store at `location`, or None: every file meta.json
    records must be listed with its size and MD5 (the ETag of our single-part uploads)."""
    objects = listing(location, client)
    for name, recorded in meta["checksums"].items():
        if name not in objects:
            return f"{name} is missing from {location}"
        if objects[name]["size"] != recorded["size"]:
            return (
                f"{name} holds {objects[name]['size']} bytes in {location}, "
                f"expected {recorded['size']}"
            )
        if "md5" in recorded and objects[name]["etag"] != recorded["md5"]:
            return f"{name} in {location} does not match its md5 recorded at publish"
    return None


def upload(local: Path, location: S3Location, client=None) -> None:
    """Publish the finished local store `local` to `location`: any old meta.json is deleted
    first (from then on the prefix reads as incomplete), then the data files go up, stale
    objects of an earlier build are removed, and meta.json goes last."""
    client = client or location.client()
    meta = json.loads((local / META).read_text())
    names = list(meta["checksums"])
    with s3_errors(location, client):
        client.delete_object(Bucket=location.bucket, Key=location.key(META))
        for name in names:
            log.info("Uploading %s to %s", name, location)
            with open(local / name, "rb") as body:
                client.put_object(Bucket=location.bucket, Key=location.key(name), Body=body)
        for name in set(listing(location, client)) - set(names) - {META}:
            client.delete_object(Bucket=location.bucket, Key=location.key(name))
        client.put_object(
            Bucket=location.bucket, Key=location.key(META), Body=(local / META).read_bytes()
        )


_REGISTERED = False


def _register_downloader() -> None:
    """Read s3:// through `CheckedS3Downloader` (once per process)."""
    global _REGISTERED
    if not _REGISTERED:
        from litdata.streaming.downloader import register_downloader

        register_downloader("s3://", _downloader_class(), overwrite=True)
        _REGISTERED = True


def _downloader_class():
    """litdata's S3 downloader with two changes. A chunk that arrives shorter than its index
    says (cut short in the bucket) fails at once, naming it; litdata would wait minutes for
    the rest. From a plain http:// endpoint (an in-cluster MinIO or SeaweedFS) chunks come
    through boto3: litdata fetches them with obstore, whose client it builds without
    `allow_http`, so it refuses such endpoints (litdata 0.2.76)."""
    from boto3.s3.transfer import TransferConfig
    from litdata.streaming.downloader import S3Downloader

    class CheckedS3Downloader(S3Downloader):
        def __init__(self, remote_dir, cache_dir, chunks, storage_options=None, **kwargs):
            super().__init__(remote_dir, cache_dir, chunks, storage_options, **kwargs)
            endpoint = str((storage_options or {}).get("endpoint_url") or "")
            self._plain_http = endpoint.startswith("http://")
            self._sizes = {c["filename"]: c["chunk_bytes"] for c in chunks or []}

        def download_file(self, remote_filepath: str, local_filepath: str) -> None:
            if self._plain_http:
                self._boto_download(remote_filepath, local_filepath)
            else:
                super().download_file(remote_filepath, local_filepath)
            self._check_size(remote_filepath, local_filepath)

        async def adownload_file(self, remote_filepath: str, local_filepath: str) -> None:
            if self._plain_http:
                await asyncio.to_thread(self._boto_download, remote_filepath, local_filepath)
                self._notify_published(local_filepath)
            else:
                await super().adownload_file(remote_filepath, local_filepath)
            self._check_size(remote_filepath, local_filepath)

        def _check_size(self, remote_filepath: str, local_filepath: str) -> None:
            expected = self._sizes.get(os.path.basename(local_filepath))
            size = os.path.getsize(local_filepath) if os.path.exists(local_filepath) else None
            if expected is not None and size is not None and size != expected:
                os.remove(local_filepath)
                raise OSError(
                    f"{remote_filepath} holds {size} bytes, its index.json says {expected}"
                )

        def _boto_download(self, remote_filepath: str, local_filepath: str) -> None:
            if os.path.exists(local_filepath):
                return
            obj = urlparse(remote_filepath)
            tmp = self._temp_download_path(local_filepath)
            try:
                os.makedirs(os.path.dirname(local_filepath) or ".", exist_ok=True)
                self._client.client.download_file(
                    obj.netloc, obj.path.lstrip("/"), tmp, Config=TransferConfig(use_threads=False)
                )
                self._publish_file(tmp, local_filepath)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
                raise

        async def adownload_bytes(self, remote_filepath, offset, length, local_chunkpath):
            if not self._plain_http:
                return await super().adownload_bytes(
                    remote_filepath, offset, length, local_chunkpath
                )
            data = await asyncio.to_thread(
                self.download_bytes, remote_filepath, offset, length, local_chunkpath
            )
            if len(data) != length:
                raise OSError(f"short range read of {remote_filepath}: {len(data)} of {length}")
            return data

        async def adownload_fileobj(self, remote_filepath: str):
            if not self._plain_http:
                return await super().adownload_fileobj(remote_filepath)
            buffer = io.BytesIO()
            await asyncio.to_thread(self.download_fileobj, remote_filepath, buffer)
            return buffer.getvalue()

    return CheckedS3Downloader
