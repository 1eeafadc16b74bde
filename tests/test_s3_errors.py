"""Failed GETs are classified by what the clients type (exception classes, HTTP status, S3 error code), checked
on the errors obstore and s3fs really raise against a real S3 server: SeaweedFS for 403 (a wrong secret; it
checks signatures, moto does not) and 404, and the fault proxy in front of it for 503 SlowDown, a dropped
connection and a timeout."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import obstore
import pytest
import s3fs
from obstore.exceptions import GenericError
from obstore.store import S3Store

from seiscli.data.retry import ReadError, RetryingStore, RetryPolicy, classify, process_stats, status_of
from seiscli.data.s3local import FaultProxy, Faults
from seiscli.data.seaweed import SeaweedS3
from seiscli.data.store import open_store

KEY, BODY = "obj", b"0123456789" * 100


@pytest.fixture(scope="module")
def bucket(seaweed_s3: SeaweedS3) -> str:
    name = "errors-test"
    seaweed_s3.create_bucket(name)
    seaweed_s3.client().put_object(Bucket=name, Key=KEY, Body=BODY)
    return name


@pytest.fixture
def proxy(seaweed_s3: SeaweedS3) -> Iterator[FaultProxy]:
    p = FaultProxy(seaweed_s3.endpoint, Faults())
    yield p
    p.stop()


def obstore_get(endpoint: str, bucket: str, key: str, secret: str, timeout_s: float) -> Callable[[], Any]:
    store = S3Store(
        bucket,
        config={"endpoint": endpoint, "region": "us-east-1", "access_key_id": "testing", "secret_access_key": secret},
        client_options={"allow_http": True, "timeout": f"{int(timeout_s * 1000)}ms"},
        retry_config={"max_retries": 0},
    )
    return lambda: obstore.get(store, key).bytes()


def s3fs_get(endpoint: str, bucket: str, key: str, secret: str, timeout_s: float) -> Callable[[], Any]:
    fs = s3fs.S3FileSystem(
        endpoint_url=endpoint, key="testing", secret=secret, skip_instance_cache=True,
        config_kwargs={"retries": {"total_max_attempts": 1}, "read_timeout": timeout_s, "connect_timeout": timeout_s},
    )  # fmt: skip
    fs.retries = 1
    return lambda: fs.cat_file(f"{bucket}/{key}", start=0, end=100)  # a ranged GET, as zarr's reads are


CLIENTS = {"obstore": obstore_get, "s3fs": s3fs_get}


def raised(fn: Callable[[], Any]) -> BaseException:
    with pytest.raises(Exception) as info:
        fn()
    return info.value


@pytest.mark.parametrize("client", CLIENTS)
def test_403_and_404_are_permanent(seaweed_s3: SeaweedS3, bucket: str, client: str) -> None:
    get = CLIENTS[client]
    assert get(seaweed_s3.endpoint, bucket, KEY, "testing", 5)()[:10] == BODY[:10]  # the setup itself works
    denied = raised(get(seaweed_s3.endpoint, bucket, KEY, "wrong-secret", 5))
    assert classify(denied) == "permanent"
    missing = raised(get(seaweed_s3.endpoint, bucket, "no-such-key", "testing", 5))
    assert isinstance(missing, FileNotFoundError) and classify(missing) == "permanent"
    if client == "s3fs":  # botocore's status and code, read from the ClientError under s3fs's PermissionError
        assert status_of(denied)[0] == 403 and status_of(missing)[0] == 404


@pytest.mark.parametrize("client", CLIENTS)
def test_503_slowdown_is_throttling(proxy: FaultProxy, bucket: str, client: str) -> None:
    proxy.faults.slowdown = 1.0
    e = raised(CLIENTS[client](proxy.endpoint, bucket, KEY, "testing", 5))
    assert classify(e) == "throttle" and status_of(e)[0] == 503
    assert proxy.faults.counts["slowdown"] >= 1


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("fault", ["reset", "timeout"])
def test_dropped_connections_and_timeouts_are_transient(
    proxy: FaultProxy, bucket: str, client: str, fault: str
) -> None:
    if fault == "reset":
        proxy.faults.reset = 1.0
    else:
        proxy.faults.latency_s = 2.0  # the client gives up after 0.5 s
    e = raised(CLIENTS[client](proxy.endpoint, bucket, KEY, "testing", 0.5))
    assert classify(e) == "transient" and status_of(e) == (None, None), repr(e)


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        # object_store's RetryError wording; the timing once held "403" and turned a 503 into a permanent error
        ("GET http://h/k in 987.403µs - Server returned non-2xx status code: 503 Service Unavailable", "throttle"),
        ("GET http://h/k in 1.2ms - Server returned non-2xx status code: 500 Internal Server Error", "transient"),
        ("GET http://h/k in 403.1ms - Server returned non-2xx status code: 400 Bad Request", "permanent"),
        ("GET http://h/k in 403.1ms - HTTP error: error sending request", "transient"),
    ],
)  # fmt: skip
def test_obstore_generic_errors_by_their_status_field(message: str, kind: str) -> None:
    assert classify(GenericError(message)) == kind  # obstore's own class; it carries no status attribute


@pytest.mark.parametrize("client", CLIENTS)
def test_a_denied_read_is_not_retried(
    seaweed_s3: SeaweedS3, bucket: str, client: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the loader's own store: a 403 fails at once (no retry), counted as one error."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    options = {"endpoint_url": seaweed_s3.endpoint, "skip_instance_cache": True}
    store = open_store(f"s3://{bucket}", options, client=client, policy=RetryPolicy(attempts=5, seed=0))  # type: ignore[arg-type]
    assert isinstance(store, RetryingStore)
    process_stats().take()
    with pytest.raises(ReadError):
        sync(store.get(KEY, default_buffer_prototype()))
    stats = process_stats().take()
    assert stats.errors == 1 and stats.retries == 0
