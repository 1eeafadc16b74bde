"""Where volumes live: local paths and object-store URIs, their storage options and glob expansion.

Every open of a dataset goes through `storage_options_for` so that endpoints (a local S3 server,
another region) are configured in one place.
"""

from __future__ import annotations

import glob
import os
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from zarr.abc.store import Store

    from seiscli.data.retry import RetryPolicy

S3Client = Literal["obstore", "s3fs"]
S3_CLIENTS: tuple[str, ...] = ("obstore", "s3fs")
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60  # one chunk GET; a stalled connection is cut and retried rather than awaited forever

REMOTE_PREFIXES = ("s3://", "gs://", "gcs://", "az://", "abfs://", "http://", "https://")


def is_remote(uri: str) -> bool:
    return uri.startswith(REMOTE_PREFIXES)


def storage_options_for(
    uri: str, *, endpoint_url: str | None = None, region: str | None = None, extra: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """fsspec storage options for `uri`; None for local paths (zarr then uses its LocalStore)."""
    if not is_remote(uri):
        return None
    opts: dict[str, Any] = dict(extra or {})
    if uri.startswith("s3://"):
        client = dict(opts.pop("client_kwargs", {}) or {})
        if endpoint_url:
            opts["endpoint_url"] = endpoint_url
        if region:
            client["region_name"] = region
        if client:
            opts["client_kwargs"] = client
    return opts


def local_path(uri: str) -> str:
    return uri.removeprefix("file://")


def exists(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    if not is_remote(uri):
        return os.path.exists(local_path(uri))
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return bool(fs.exists(path))


def remove(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete a dataset (a folder, or every object under the prefix)."""
    if not is_remote(uri):
        import shutil

        shutil.rmtree(local_path(uri))
        return
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    fs.rm(path, recursive=True)
    fs.invalidate_cache()


def stored_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> int:
    """Bytes the dataset takes in its store (after compression)."""
    if not is_remote(uri):
        total = 0
        for root, _, files in os.walk(local_path(uri)):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return total
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return int(fs.du(path, total=True))


def expand(patterns: list[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """Glob patterns to a sorted, de-duplicated list of dataset URIs; a pattern matching nothing is an error."""
    found: list[str] = []
    for pattern in patterns:
        if not any(ch in pattern for ch in "*?["):
            matches = [pattern]
        elif is_remote(pattern):
            import fsspec

            fs, path = fsspec.core.url_to_fs(pattern, **(storage_options or {}))
            protocol = pattern.split("://", 1)[0]
            matches = [f"{protocol}://{m}" for m in sorted(fs.glob(path))]
        else:
            matches = sorted(glob.glob(local_path(pattern)))
        if not matches:
            raise FileNotFoundError(f"data.uris: pattern {pattern!r} matches no dataset")
        found.extend(matches)
    return list(dict.fromkeys(found))


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise ValueError(f"{uri}: no bucket in the S3 URI (expected s3://bucket/key)")
    return bucket, key.strip("/")


def _obstore_s3(uri: str, options: dict[str, Any]) -> Any:
    """An obstore S3 store with the same endpoint and region as the fsspec `options`, credentials from the
    standard AWS chain through boto3 (environment, profile, SSO, container or instance role), its own
    retries off (RetryingStore retries and counts)."""
    from obstore.auth.boto3 import Boto3CredentialProvider
    from obstore.store import S3Store

    bucket, prefix = _split_s3(uri)
    endpoint = options.get("endpoint_url")
    region = (options.get("client_kwargs") or {}).get("region_name")
    config: dict[str, Any] = {}
    if endpoint:
        config["endpoint"] = endpoint
    if region:
        config["region"] = region
    client_options: dict[str, Any] = {
        "connect_timeout": f"{CONNECT_TIMEOUT_S}s",
        "timeout": f"{READ_TIMEOUT_S}s",
        "allow_http": bool(endpoint and endpoint.startswith("http://")),
    }
    ca_bundle = os.environ.get("AWS_CA_BUNDLE")  # botocore's variable for a private CA; obstore takes the PEM
    if ca_bundle:
        with open(ca_bundle, "rb") as f:
            client_options["root_certificate"] = f.read()
    provider = Boto3CredentialProvider()
    if not region and "region" not in provider.config:
        config["region"] = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return S3Store(
        bucket,
        prefix=prefix or None,
        config=config,  # type: ignore[arg-type]
        client_options=client_options,  # type: ignore[arg-type]
        retry_config={"max_retries": 0},
        credential_provider=provider,
    )


def _s3fs_options(options: dict[str, Any]) -> dict[str, Any]:
    """s3fs and botocore retry on their own and silently; turn both off (RetryingStore retries and counts)."""
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("retries", {"total_max_attempts": 1})
    config.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
    config.setdefault("read_timeout", READ_TIMEOUT_S)
    return {**options, "config_kwargs": config}


def open_store(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    *,
    client: S3Client = "obstore",
    policy: RetryPolicy | None = None,
) -> Store:
    """A read-only zarr store for `uri`, wrapped in RetryingStore. Builds network clients, so call it in the
    process that will read (after a fork), never before."""
    from zarr.storage import FsspecStore, LocalStore

    from seiscli.data.retry import RetryingStore

    inner: Store
    if not is_remote(uri):
        inner = LocalStore(local_path(uri), read_only=True)
    elif uri.startswith("s3://") and client == "obstore":
        from zarr.storage import ObjectStore

        inner = ObjectStore(_obstore_s3(uri, storage_options or {}), read_only=True)
    elif uri.startswith("s3://"):
        inner = FsspecStore.from_url(uri, storage_options=_s3fs_options(storage_options or {}), read_only=True)
        inner.fs.retries = 1  # a class attribute in s3fs, not a constructor option
    else:
        inner = FsspecStore.from_url(uri, storage_options=storage_options, read_only=True)
    return RetryingStore(inner, policy)
