"""Listing shards (local, file://, s3:// through moto, lists, globs, brace notation) and partitioning them."""

from __future__ import annotations

import hashlib

import fsspec
import pytest

from tasks.io.locations import Location
from tasks.errors import UserError
from tests.support.s3 import NO_RETRIES
from tasks.io.partition import Partition, list_shard_sizes, list_shards, parse_blocksize, partition_shards
from tests.support.tars import shard_of_good_samples, tar_bytes, write_tar



@pytest.fixture()
def shard_dir(tmp_path):
    """part-1, part-2, part-10 (.tar), sub/deep.TAR, a .tar.gz and a stray text file."""
    root = tmp_path / "shards"
    for name in ["part-10.tar", "part-2.tar", "part-1.tar", "sub/deep.TAR"]:
        write_tar(root / name, shard_of_good_samples([name.split("/")[-1].split(".")[0]]))
    write_tar(root / "packed.tar.gz", shard_of_good_samples(["packed"]), gzip=True)
    (root / "notes.txt").write_text("not a shard")
    return root


def test_directory_is_listed_recursively_in_natural_order(shard_dir):
    assert list_shards(str(shard_dir)) == [
        str(shard_dir / "part-1.tar"),
        str(shard_dir / "part-2.tar"),
        str(shard_dir / "part-10.tar"),
        str(shard_dir / "sub" / "deep.TAR"),
    ]


def test_file_url_relative_and_absolute_paths_name_shards_the_same_way(shard_dir, monkeypatch):
    monkeypatch.chdir(shard_dir.parent)
    absolute = list_shards(str(shard_dir))
    assert list_shards("shards") == absolute
    assert list_shards(f"file://{shard_dir}/") == absolute
    assert list_shards(shard_dir) == absolute  # a pathlib.Path


def test_file_extensions_select_shards(shard_dir):
    assert list_shards(shard_dir, file_extensions=[".tar.gz"]) == [str(shard_dir / "packed.tar.gz")]
    both = list_shards(shard_dir, file_extensions=["tar", ".TAR.GZ"])  # leading dot optional, any case
    names = ["packed.tar.gz", "part-1.tar", "part-2.tar", "part-10.tar", "sub/deep.TAR"]
    assert both == [str(shard_dir / name) for name in names]


def test_brace_notation_lists_and_globs(tmp_path):
    for index in range(12):
        write_tar(tmp_path / f"part-{index:06d}.tar", shard_of_good_samples([f"k{index}"]))
    braced = list_shards(str(tmp_path / "part-{000002..000004}.tar"))
    assert braced == [str(tmp_path / f"part-{index:06d}.tar") for index in (2, 3, 4)]
    # WebDataset's "::" joins patterns; duplicates collapse; order is natural whatever the input order.
    joined = list_shards(f"{tmp_path}/part-{{000010..000011}}.tar::{tmp_path}/part-000003.tar")
    assert joined == [str(tmp_path / f"part-{index:06d}.tar") for index in (3, 10, 11)]
    listed = list_shards([str(tmp_path / "part-000011.tar"), str(tmp_path / "part-000001.tar"), str(tmp_path / "part-000001.tar")])
    assert listed == [str(tmp_path / "part-000001.tar"), str(tmp_path / "part-000011.tar")]
    assert list_shards(str(tmp_path / "part-00000[1-2].tar")) == [str(tmp_path / f"part-{i:06d}.tar") for i in (1, 2)]


def test_list_mixing_shards_and_directories(shard_dir, tmp_path):
    extra = write_tar(tmp_path / "extra.tar", shard_of_good_samples(["x"]))
    assert list_shards([str(extra), str(shard_dir / "sub")]) == [str(extra), str(shard_dir / "sub" / "deep.TAR")]


def test_missing_shards_in_a_brace_range_are_named(tmp_path):
    for index in (0, 1):
        write_tar(tmp_path / f"part-{index}.tar", shard_of_good_samples([f"k{index}"]))
    with pytest.raises(UserError, match=r"^2 of 4 shards named in file_paths do not exist \(first: .*part-2\.tar"):
        list_shards(str(tmp_path / "part-{0..3}.tar"))


def test_no_shard_found_is_one_clear_sentence(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("x")
    with pytest.raises(UserError, match=r"^No shard ending in \.tar was found under .*empty; check file_paths and file_extensions\.$"):
        list_shards(str(tmp_path / "empty"))
    with pytest.raises(UserError, match=r"No shard ending in \.tar was found under .*texts"):
        list_shards(str(tmp_path / "texts"))
    with pytest.raises(UserError, match=r"^No shard found: .*nowhere does not exist; check file_paths\.$"):
        list_shards(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"^No shard ending in \.tar matches .*\*\.tar"):
        list_shards(str(tmp_path / "empty" / "*.tar"))


def test_bad_arguments_get_one_sentence(tmp_path):
    with pytest.raises(UserError, match=r"^ftpx://host/x uses the unknown protocol 'ftpx://'"):
        list_shards("ftpx://host/x")
    with pytest.raises(UserError, match=r"^gs://bucket/x needs a filesystem package that is not installed"):
        list_shards("gs://bucket/x")
    with pytest.raises(UserError, match=r"^file_paths is empty"):
        list_shards([])
    with pytest.raises(UserError, match=r"empty entry"):
        list_shards(["", str(tmp_path)])
    with pytest.raises(UserError, match=r"names no extension"):
        list_shards(str(tmp_path), file_extensions=[])


def test_s3_prefix_brace_and_listing_errors(s3_bucket):
    fs = fsspec.filesystem("s3")
    for index in range(3):
        fs.pipe(f"{s3_bucket}/data/part-{index:06d}.tar", tar_bytes(shard_of_good_samples([f"k{index}"])))
    fs.pipe(f"{s3_bucket}/data/readme.md", b"not a shard")
    expected = [f"s3://{s3_bucket}/data/part-{index:06d}.tar" for index in range(3)]
    assert list_shards(f"s3://{s3_bucket}/data") == expected
    assert list_shards(f"s3://{s3_bucket}/data/") == expected
    assert list_shards(f"s3://{s3_bucket}/data/part-{{000000..000002}}.tar") == expected
    assert list_shards(f"s3a://{s3_bucket}/data/part-000001.tar") == [expected[1]]  # one spelling per shard
    with pytest.raises(UserError, match=r"^5 of 8 shards named in file_paths do not exist \(first: s3://.*/data/part-000003\.tar"):
        list_shards(f"s3://{s3_bucket}/data/part-{{000000..000007}}.tar")
    with pytest.raises(UserError, match=r"^No shard found: s3://.*/nothing-here does not exist"):
        list_shards(f"s3://{s3_bucket}/nothing-here")
    with pytest.raises(UserError, match=r"^Cannot list s3://no-such-bucket-anywhere/data: .*bucket does not exist.*; check the bucket"):
        list_shards("s3://no-such-bucket-anywhere/data")


def test_unreachable_endpoint_is_one_sentence_naming_the_url(unreachable_s3):
    with pytest.raises(UserError, match=r"^Cannot list s3://bucket/data \(EndpointConnectionError: .*\); check the storage endpoint"):
        list_shards("s3://bucket/data", inputs=Location("s3://bucket/data", NO_RETRIES))


def test_partitions_group_consecutive_shards_with_stable_ids():
    urls = [f"s3://bucket/part-{index:06d}.tar" for index in range(5)]
    partitions = partition_shards(urls, files_per_partition=2)
    assert [p.index for p in partitions] == [0, 1, 2]
    assert [p.shard_urls for p in partitions] == [tuple(urls[0:2]), tuple(urls[2:4]), (urls[4],)]
    # The id depends on the shard URLs only: the same group has the same id in another run or position.
    assert Partition(index=7, shard_urls=tuple(urls[2:4])).partition_id == partitions[1].partition_id
    assert len({p.partition_id for p in partitions}) == 3
    assert partitions[0].partition_id == hashlib.sha256("\n".join(urls[0:2]).encode()).hexdigest()[:16]
    # Pinned: changing how ids are derived would orphan every cached result.
    assert Partition(0, ("s3://bucket/part-000000.tar",)).partition_id == "b1cd30a8f91a4c2d"
    assert partition_shards(urls) == [Partition(i, (url,)) for i, url in enumerate(urls)]
    assert partition_shards([], 3) == []


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_files_per_partition_must_be_a_positive_whole_number(bad):
    with pytest.raises(UserError, match=r"^files_per_partition must be a whole number of at least 1"):
        partition_shards(["a.tar"], files_per_partition=bad)


def test_unreachable_endpoint_with_a_list_of_shards(unreachable_s3):
    with pytest.raises(UserError, match=r"^Cannot list s3://bucket/a-0\.tar \(EndpointConnectionError: "):
        list_shards("s3://bucket/a-{0..3}.tar", inputs=Location("s3://bucket", NO_RETRIES))


def test_one_shard_spelled_many_ways_is_listed_once(tmp_path, monkeypatch):
    shard = write_tar(tmp_path / "in" / "x.tar", shard_of_good_samples(["k"]))
    (tmp_path / "in" / "link.tar").symlink_to(shard)
    (tmp_path / "alias").symlink_to(tmp_path / "in", target_is_directory=True)
    monkeypatch.chdir(tmp_path / "in")
    spellings = ["x.tar", "./x.tar", f"{tmp_path}//in/./x.tar", "link.tar", str(tmp_path / "alias" / "x.tar")]
    assert list_shards(spellings) == [str(shard)]
    # a directory holding the shard and a symlink to it, listed directly or through a symlinked folder
    assert list_shards(str(tmp_path / "alias")) == [str(shard)]
    assert list_shards(f"{tmp_path}//in/") == [str(shard)]
    assert partition_shards(list_shards(spellings)) == [Partition(0, (str(shard),))]


def test_remote_spellings_collapse_in_natural_order(s3_bucket):
    fs = fsspec.filesystem("s3")
    for index in (2, 10):
        fs.pipe(f"{s3_bucket}/data/part-{index}.tar", tar_bytes(shard_of_good_samples([f"k{index}"])))
    listed = list_shards([f"s3://{s3_bucket}/data//part-10.tar", f"s3://{s3_bucket}/data/./part-10.tar", f"s3://{s3_bucket}/data/part-2.tar",
                          f"s3a://{s3_bucket}//data/part-10.tar"])
    assert listed == [f"s3://{s3_bucket}/data/part-2.tar", f"s3://{s3_bucket}/data/part-10.tar"]


def test_blocksize_groups_consecutive_shards_by_their_listed_sizes():
    urls = [f"s3://b/part-{index}.tar" for index in range(6)]
    sizes = [100, 300, 50, 700, None, 10]
    groups = [p.shard_urls for p in partition_shards(urls, shard_sizes=sizes, blocksize=400)]
    # 100+300 fill a block; 50 starts the next; 700 is bigger than a block and stands alone, as does the shard of unknown size.
    assert groups == [tuple(urls[0:2]), (urls[2],), (urls[3],), (urls[4],), (urls[5],)]
    assert [p.index for p in partition_shards(urls, shard_sizes=sizes, blocksize=400)] == list(range(5))
    # Ids depend on the shards alone: the same group formed by blocksize or by files_per_partition is the same partition.
    assert partition_shards(urls, shard_sizes=sizes, blocksize=400)[0] == partition_shards(urls, 2)[0]
    # Empty shards join their neighbours, but never a shard of unknown size.
    assert [p.shard_urls for p in partition_shards(urls[:4], shard_sizes=[0, 0, None, 0], blocksize=400)] == [
        tuple(urls[0:2]), (urls[2],), (urls[3],)]


@pytest.mark.parametrize(("spelling", "expected"), [("512MB", 512_000_000), ("1GiB", 1 << 30), ("1.5kb", 1500), ("4096", 4096), (64, 64)])
def test_blocksize_spellings(spelling, expected):
    assert parse_blocksize(spelling) == expected


@pytest.mark.parametrize("bad", ["lots", "-1MB", "0", "", True, "12 parsecs", "512Mi", "1Ti"])
def test_bad_blocksize_is_one_sentence(bad):
    with pytest.raises(UserError, match=r"^blocksize must be"):
        parse_blocksize(bad)


def test_listing_gives_sizes_locally_and_on_s3_without_extra_requests(shard_dir, s3_bucket):
    local = list_shard_sizes(str(shard_dir))
    assert local == {url: (shard_dir / url).stat().st_size for url in list_shards(str(shard_dir))}
    fs = fsspec.filesystem("s3", **NO_RETRIES)
    payloads = {f"part-{index:06d}.tar": tar_bytes(shard_of_good_samples([f"k{index}"] * (index + 1))) for index in range(3)}
    for name, data in payloads.items():
        fs.pipe(f"{s3_bucket}/data/{name}", data)
    expected = {f"s3://{s3_bucket}/data/{name}": len(data) for name, data in payloads.items()}
    assert list_shard_sizes(f"s3://{s3_bucket}/data") == expected
    assert list_shard_sizes([f"s3://{s3_bucket}/data/part-000002.tar", f"s3://{s3_bucket}/data/part-000000.tar"]) == {
        url: expected[url] for url in (f"s3://{s3_bucket}/data/part-000000.tar", f"s3://{s3_bucket}/data/part-000002.tar")
    }
