"""Counting the S3 requests a filter run makes, at the server side of a loopback proxy in front of moto.

`count_filter_requests(...)` uploads `partitions` one-shard partitions of small images to a bucket, runs
the flow once cold and once more warm (everything cached), every request going through a `FaultyS3Proxy`
that injects nothing and records each request's method and path. `request_kinds` names each request by
method, query operation and path with partition numbers and content hashes replaced, so runs over
different numbers of partitions can be compared kind by kind.
"""

from __future__ import annotations

import os
import re
import threading
from collections import Counter
from typing import Callable

from tests.support.faulty_s3 import FaultyS3Proxy
from tests.support.tars import shard_of_good_samples, tar_bytes

_PARTITION_NUMBER = re.compile(r"(?<![0-9])[0-9]{6}(?![0-9])")
_HEX_RUN = re.compile(r"[0-9a-f]{12,}")
_QUERY_OPERATION = re.compile(r"^([a-z-]+)")


def request_kinds(requests: list[tuple[str, str]], bucket: str) -> Counter:
    """(method, normalised path) -> count: partition numbers become N, content hashes H, queries their operation name."""
    kinds: Counter = Counter()
    for method, raw in requests:
        path, _, query = raw.partition("?")
        path = path.replace(f"/{bucket}", "/BUCKET", 1)
        path = _PARTITION_NUMBER.sub("N", _HEX_RUN.sub("H", path))
        operation = _QUERY_OPERATION.match(query)
        prefix = re.search(r"prefix=([^&]*)", query)
        if operation:
            path += "?" + operation.group(1)
        if prefix:
            path += " prefix=" + _PARTITION_NUMBER.sub("N", _HEX_RUN.sub("H", prefix.group(1)))
        kinds[(method, path)] += 1
    return kinds


def upload_one_shard_partitions(fs, bucket: str, partitions: int, images_per_shard: int = 2) -> str:
    for index in range(partitions):
        data = tar_bytes(shard_of_good_samples([f"{index:06d}/{j:02d}" for j in range(images_per_shard)], size=(64, 48)))
        fs.pipe_file(f"{bucket}/in/part-{index:06d}.tar", data)
    return f"s3://{bucket}/in"


def count_filter_requests(
    run_flow: Callable[..., dict], s3_endpoint: str, bucket: str, partitions: int, parameters: dict
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The requests of a cold run, then of a warm re-run, over `partitions` one-shard partitions in `bucket`."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    file_paths = upload_one_shard_partitions(fs, bucket, partitions)
    seen: list[tuple[str, str]] = []
    lock = threading.Lock()

    def record(method: str, path: str) -> None:
        with lock:
            seen.append((method, path))

    saved = os.environ.get("AWS_ENDPOINT_URL_S3")
    runs = []
    with FaultyS3Proxy(s3_endpoint, record) as proxy:
        os.environ["AWS_ENDPOINT_URL_S3"] = proxy.url
        try:
            for _ in ("cold", "warm"):
                s3fs.S3FileSystem.clear_instance_cache()
                seen.clear()
                run_flow(file_paths=file_paths, output_path=f"s3://{bucket}/out", cache_path=f"s3://{bucket}/cache", **parameters)
                with lock:
                    runs.append(list(seen))
        finally:
            if saved is None:
                os.environ.pop("AWS_ENDPOINT_URL_S3", None)
            else:
                os.environ["AWS_ENDPOINT_URL_S3"] = saved
            s3fs.S3FileSystem.clear_instance_cache()
    return runs[0], runs[1]


def per_partition_and_fixed(small: Counter, large: Counter, small_n: int, large_n: int) -> tuple[Counter, Counter, Counter]:
    """Split request kinds into per-partition ones (count proportional to N), fixed ones (same count) and the rest."""
    per_partition: Counter = Counter()
    fixed: Counter = Counter()
    neither: Counter = Counter()
    for kind in set(small) | set(large):
        a, b = small.get(kind, 0), large.get(kind, 0)
        if a == b:
            fixed[kind] = a
        elif a * large_n == b * small_n:
            per_partition[kind] = a / small_n
        else:
            neither[kind] = (a, b)
    return per_partition, fixed, neither
