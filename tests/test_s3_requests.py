"""S3 requests per partition do not grow with the number of partitions (counted at the server, moto)."""

from __future__ import annotations

import uuid

import pytest

from flows.nsfw_filter import nsfw_filter
from tests.support.s3_requests import count_filter_requests, per_partition_and_fixed, request_kinds

pytestmark = pytest.mark.usefixtures("prefect_api")


def run_kinds(s3_endpoint, partitions, tiny_clip_768, laion_dir, tmp_path):
    import s3fs

    bucket = f"requests-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}).mkdir(bucket)
    config_path, checkpoint_path = tiny_clip_768
    parameters = {
        "clip_model": str(config_path),
        "clip_pretrained": str(checkpoint_path),
        "nsfw_weights": str(laion_dir / "vit_l_14.safetensors"),
        "model_dir": str(tmp_path / "models"),
        "max_workers": 2,
    }
    cold, warm = count_filter_requests(nsfw_filter, s3_endpoint, bucket, partitions, parameters)
    return request_kinds(cold, bucket), request_kinds(warm, bucket)


def test_requests_per_partition_are_the_same_at_3_and_9_partitions(s3_endpoint, tiny_clip_768, laion_dir, tmp_path):
    small_cold, small_warm = run_kinds(s3_endpoint, 3, tiny_clip_768, laion_dir, tmp_path)
    large_cold, large_warm = run_kinds(s3_endpoint, 9, tiny_clip_768, laion_dir, tmp_path)
    for small, large in ((small_cold, large_cold), (small_warm, large_warm)):
        per_partition, fixed, neither = per_partition_and_fixed(small, large, 3, 9)
        # Every kind of request is either made a fixed number of times per partition (the same at 3 and at 9) or
        # a fixed number of times per run; none grows faster.
        assert not neither, neither
        # No partition lists a folder: the only listings per partition are the storage client's one-key probe
        # after a missing object (prefix = that object's own name).
        listings = [path for _, path in per_partition if "?list-type" in path]
        assert all(path.endswith((".parquet%2F", ".json%2F", ".tar%2F")) for path in listings), listings
        assert sum(fixed.values()) < 40, fixed
    # Cold: each shard's bytes are read from storage once (the read task copies it; embedding and filtering read
    # the copy), its entry written once and read once.
    cold_per_partition, _, _ = per_partition_and_fixed(small_cold, large_cold, 3, 9)
    assert cold_per_partition[("GET", "/BUCKET/in/part-N.tar")] == 1
    entry_writes = [count for (method, path), count in cold_per_partition.items() if method == "PUT" and path.startswith("/BUCKET/cache/tiny-clip-H/part-N-etag-")]
    assert entry_writes == [1], cold_per_partition
    # Asked once whether the entry exists (the read task's lookup), and once more by the read that scores it.
    entry_heads = [count for (method, path), count in cold_per_partition.items() if method == "HEAD" and path.startswith("/BUCKET/cache/tiny-clip-H/part-N-etag-")]
    assert entry_heads == [2], cold_per_partition
    # Warm: no shard is read and no entry written; Prefect's record of each embedding task is read instead.
    warm_per_partition, _, _ = per_partition_and_fixed(small_warm, large_warm, 3, 9)
    assert not any(path.startswith("/BUCKET/in/part-") and method == "GET" for method, path in warm_per_partition)
    assert not any(method == "PUT" and "/cache/" in path for method, path in warm_per_partition)
