"""Both storage back ends against real stores: S3 refuses a wrong key; keys are never client paths."""

from __future__ import annotations

import httpx
import pytest
from servers import ALICE, S3_ACCESS_KEY, S3_BUCKET, S3_SECRET_KEY, launch_stack

from jobs.storage import WAV, LocalStorage, S3Storage, StorageKeyInvalid, StorageUnavailable


def s3_storage(s3_server, *, secret_key: str = S3_SECRET_KEY, bucket: str = S3_BUCKET) -> S3Storage:
    return S3Storage(endpoint_url=s3_server.endpoint_url, public_endpoint_url=None, bucket=bucket, region="us-east-1",
                     access_key=S3_ACCESS_KEY, secret_key=secret_key, url_ttl_seconds=60,
                     timeout_seconds=3)  # fmt: skip


def test_s3_round_trip_and_presigned_wav(s3_server):
    storage = s3_storage(s3_server)
    storage.check()
    storage.put("outputs/roundtrip.wav", b"RIFF-not-really", content_type=WAV)
    assert storage.get("outputs/roundtrip.wav") == b"RIFF-not-really"
    signed = storage.signed_url("outputs/roundtrip.wav")
    response = httpx.get(signed.url)
    assert response.status_code == 200 and response.headers["content-type"] == WAV
    assert "X-Amz-Expires=60" in signed.url and f"/{S3_BUCKET}/outputs/" in signed.url  # path-style
    storage.delete("outputs/roundtrip.wav")
    assert httpx.get(storage.signed_url("outputs/roundtrip.wav").url).status_code == 404
    storage.delete("outputs/roundtrip.wav")  # already gone: fine


def test_s3_refuses_a_wrong_key(s3_server):
    wrong = s3_storage(s3_server, secret_key="not-the-secret")
    with pytest.raises(StorageUnavailable, match=S3_BUCKET):
        wrong.check()
    with pytest.raises(StorageUnavailable):
        wrong.put("outputs/nope.wav", b"x", content_type=WAV)
    with pytest.raises(StorageUnavailable, match="missing-bucket"):
        s3_storage(s3_server, bucket="missing-bucket").check()


@pytest.mark.parametrize("key", ["../etc/passwd", "outputs/../../x.wav", "/abs.wav", "outputs/a.exe", "other/a.wav"])
def test_keys_outside_the_pattern_are_refused(tmp_path, key):
    storage = LocalStorage(tmp_path, signing_key=b"k", url_ttl_seconds=60)
    with pytest.raises(StorageKeyInvalid):
        storage.put(key, b"x", content_type=WAV)


def test_api_with_a_refused_s3_key_is_not_ready_and_says_why(workdir, redis_port, tiny_bundle, s3_server, sample_png):
    stack = launch_stack("s3-wrong-key", workdir=workdir, redis_port=redis_port, db=4, bundle=tiny_bundle,
                         with_worker=False, s3_endpoint_url=s3_server.endpoint_url, s3_bucket=S3_BUCKET,
                         s3_access_key=S3_ACCESS_KEY, s3_secret_key="not-the-secret", api_keys=ALICE)  # fmt: skip
    try:
        with stack.http() as anonymous, stack.http(ALICE) as operator:
            public_readiness = anonymous.get("/readyz")
            readiness = operator.get("/readyz")
            submitted = operator.post("/jobs", data={"caption": "x"},
                                      files={"image": ("s.png", sample_png, "image/png")})  # fmt: skip
    finally:
        stack.stop()
    assert public_readiness.status_code == 503  # internal endpoints only for a caller with an API key
    assert public_readiness.json()["checks"]["storage"] == {"ok": False, "detail": "unreachable"}
    assert s3_server.endpoint_url not in public_readiness.text
    assert readiness.status_code == 503
    storage = readiness.json()["checks"]["storage"]
    assert not storage["ok"] and S3_BUCKET in storage["detail"] and s3_server.endpoint_url in storage["detail"]
    assert submitted.status_code == 503 and submitted.json()["error"]["code"] == "unavailable"
