"""Where volumes live: local paths and object-store URIs, their storage options and glob expansion.

Every open of a dataset goes through `storage_options_for` so that endpoints (a local S3 server,
another region) are configured in one place.
"""

from __future__ import annotations

import glob
import os
from typing import Any

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
