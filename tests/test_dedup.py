"""Near-duplicate search and groups on synthetic embeddings with planted duplicates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import tasks.dedup.groups
from tasks.dedup.groups import DUPLICATE_COLUMNS, KEPT_COLUMNS, PAIR_COLUMNS, SKIPPED_COLUMNS, deduplicate
from tasks.dedup.search import MISSING_REASON, ZERO_REASON, screen_margin
from tasks.errors import UserError
from support.dedup_data import planted_duplicates, unit_rows

THRESHOLD = 0.99


@pytest.fixture(scope="module")
def small():
    return planted_duplicates(3000, 64, duplicate_fraction=0.2, seed=1)


@pytest.fixture(scope="module")
def medium():
    return planted_duplicates(20000, 64, duplicate_fraction=0.1, seed=2)


def found_groups(result) -> set[frozenset[tuple[str, str]]]:
    groups: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for row in result.duplicates.itertuples(index=False):
        survivor = (row.duplicate_of_shard, row.duplicate_of)
        groups.setdefault(survivor, {survivor}).add((row.shard, row.key))
    return {frozenset(members) for members in groups.values()}


def pair_set(result) -> set[tuple[str, str, str, str]]:
    return set(zip(result.pairs["shard_a"], result.pairs["key_a"], result.pairs["shard_b"], result.pairs["key_b"]))


def identifiers(num_rows: int, shard: str = "shard-0.tar") -> tuple[list[str], list[str]]:
    return [f"k{index:04d}" for index in range(num_rows)], [shard] * num_rows


def rotate(base: np.ndarray, direction: np.ndarray, cosine: float) -> np.ndarray:
    """A unit vector at `cosine` from unit `base`, towards `direction`."""
    orthogonal = direction - (direction @ base) * base
    orthogonal /= np.linalg.norm(orthogonal)
    return (cosine * base + np.sqrt(1 - cosine**2) * orthogonal).astype(np.float32)


def test_exact_search_finds_exactly_the_planted_groups(small):
    result = deduplicate(small.embeddings, small.key, small.shard, method="exact")
    planted = small.planted_groups()
    assert result.stats.method == "exact"
    assert found_groups(result) == planted
    assert result.stats.groups == len(planted)
    assert len(result.duplicates) == sum(len(group) - 1 for group in planted)
    assert len(result.kept) + len(result.duplicates) == len(small.key)
    survivors = set(zip(result.duplicates["duplicate_of_shard"], result.duplicates["duplicate_of"]))
    assert survivors <= set(zip(result.kept["shard"], result.kept["key"]))
    assert result.skipped.empty
    assert list(result.duplicates.columns) == DUPLICATE_COLUMNS and list(result.kept.columns) == KEPT_COLUMNS


def test_exact_search_pairs_are_the_pairs_above_threshold(small):
    result = deduplicate(small.embeddings, small.key, small.shard, method="exact", include_pairs=True)
    rows = {(shard, key): index for index, (shard, key) in enumerate(zip(small.shard, small.key))}
    embeddings = small.embeddings.astype(np.float64)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarity = embeddings @ embeddings.T
    first, second = np.nonzero(np.triu(similarity >= THRESHOLD, k=1))
    expected = {tuple(sorted([(small.shard[a], small.key[a]), (small.shard[b], small.key[b])])) for a, b in zip(first, second)}
    assert {((p[0], p[1]), (p[2], p[3])) for p in pair_set(result)} == expected
    assert list(result.pairs.columns) == PAIR_COLUMNS
    for row in result.pairs.itertuples(index=False):
        assert (row.shard_a, row.key_a) < (row.shard_b, row.key_b)
        assert row.similarity == pytest.approx(similarity[rows[(row.shard_a, row.key_a)], rows[(row.shard_b, row.key_b)]], abs=1e-12)
    assert result.pairs.equals(result.pairs.sort_values(["shard_a", "key_a", "shard_b", "key_b"]).reset_index(drop=True))


def test_clustered_search_recall_against_exact(medium):
    exact = deduplicate(medium.embeddings, medium.key, medium.shard, method="exact", include_pairs=True)
    clustered = deduplicate(medium.embeddings, medium.key, medium.shard, method="clustered", include_pairs=True)
    exact_pairs, clustered_pairs = pair_set(exact), pair_set(clustered)
    assert clustered.stats.method == "clustered" and clustered.stats.num_clusters > 50
    assert clustered.stats.comparisons < exact.stats.comparisons / 20
    # precision is 1 by construction: every pair is verified exactly
    assert clustered_pairs <= exact_pairs
    assert len(clustered_pairs) / len(exact_pairs) >= 0.99
    # without include_pairs, candidates are linked block by block, skipping pairs already connected
    linked = deduplicate(medium.embeddings, medium.key, medium.shard, method="clustered")
    pd.testing.assert_frame_equal(linked.duplicates, clustered.duplicates)
    pd.testing.assert_frame_equal(linked.kept, clustered.kept)
    one_cluster_each = deduplicate(
        medium.embeddings, medium.key, medium.shard, method="clustered", clusters_per_point=1, include_pairs=True
    )
    # a second and third nearest cluster recover pairs that straddle a boundary
    assert len(pair_set(one_cluster_each)) < len(clustered_pairs)


def test_clustered_search_in_every_cluster_equals_exact(small):
    exact = deduplicate(small.embeddings, small.key, small.shard, method="exact")
    everywhere = deduplicate(small.embeddings, small.key, small.shard, method="clustered", num_clusters=4, clusters_per_point=4)
    assert everywhere.stats.num_clusters == 4 and everywhere.stats.clusters_per_point == 4
    pd.testing.assert_frame_equal(everywhere.duplicates, exact.duplicates)
    pd.testing.assert_frame_equal(everywhere.kept, exact.kept)


def test_clustered_search_splits_dense_topics_and_keeps_recall():
    # rows around a few topic centres: plain k-means piles a topic into a few huge clusters
    topics = planted_duplicates(10000, 256, topics=5, seed=3)
    exact = deduplicate(topics.embeddings, topics.key, topics.shard, method="exact", include_pairs=True)
    clustered = deduplicate(topics.embeddings, topics.key, topics.shard, method="clustered", include_pairs=True)
    assert clustered.stats.split_clusters > 0
    # about a tenth of all pairs at 10,000 rows (3 of ~210 clusters per row, split where dense); 10.04% with this numpy/torch
    assert clustered.stats.comparisons < exact.stats.comparisons / 8
    assert pair_set(clustered) <= pair_set(exact)
    assert len(pair_set(clustered)) / len(pair_set(exact)) >= 0.99
    order = np.random.default_rng(15).permutation(len(topics.key))
    shuffled = deduplicate(topics.embeddings[order], topics.key[order], topics.shard[order], method="clustered", include_pairs=True)
    pd.testing.assert_frame_equal(shuffled.pairs, clustered.pairs)
    pd.testing.assert_frame_equal(shuffled.duplicates, clustered.duplicates)


@pytest.mark.parametrize("method", ["exact", "clustered"])
def test_a_flood_of_near_copies_is_one_group_linked_without_listing_its_pairs(method):
    rng = np.random.default_rng(16)
    copies = unit_rows(rng, 1, 32) + 0.003 * rng.standard_normal((1500, 32)).astype(np.float32)
    embeddings = np.concatenate([copies, unit_rows(rng, 2500, 32)]).astype(np.float32)
    key, shard = identifiers(4000)
    result = deduplicate(embeddings, key, shard, method=method)
    assert result.stats.groups == 1
    assert set(result.duplicates["key"]) | set(result.duplicates["duplicate_of"]) == set(key[:1500])
    # over a million pairs, but blocks hand on one link per row instead of the pairs
    assert result.stats.candidates < 1500
    with_pairs = deduplicate(embeddings, key, shard, method=method, include_pairs=True)
    pd.testing.assert_frame_equal(with_pairs.duplicates, result.duplicates)
    if method == "exact":
        assert len(with_pairs.pairs) == 1500 * 1499 // 2


def test_auto_method_follows_exact_max_rows(small):
    assert deduplicate(small.embeddings, small.key, small.shard).stats.method == "exact"
    auto = deduplicate(small.embeddings, small.key, small.shard, exact_max_rows=1000)
    assert auto.stats.method == "clustered"


@pytest.mark.parametrize("method", ["exact", "clustered"])
def test_result_does_not_depend_on_input_order(small, method):
    first = deduplicate(small.embeddings, small.key, small.shard, method=method, include_pairs=True)
    order = np.random.default_rng(7).permutation(len(small.key))
    shuffled = deduplicate(small.embeddings[order], small.key[order], small.shard[order], method=method, include_pairs=True)
    pd.testing.assert_frame_equal(shuffled.duplicates, first.duplicates)
    pd.testing.assert_frame_equal(shuffled.kept, first.kept)
    pd.testing.assert_frame_equal(shuffled.pairs, first.pairs)
    assert list(first.kept.itertuples(index=False)) == sorted(first.kept.itertuples(index=False), key=lambda r: (r.shard, r.key))


def test_small_blocks_and_float32_screening_give_the_same_pairs(small):
    reference = deduplicate(small.embeddings, small.key, small.shard, method="exact", include_pairs=True)
    # a threshold in the middle of the planted similarities puts many pairs within the screening margin
    threshold = float(np.median(reference.pairs["similarity"]))
    results = [
        deduplicate(small.embeddings, small.key, small.shard, method="exact", similarity_threshold=threshold,
                    matmul_dtype=dtype, block_entries=entries, include_pairs=True)
        for dtype, entries in [("float32", 1 << 24), ("bfloat16", 1 << 24), ("bfloat16", 1 << 19), ("float16", 1 << 24)]
    ]
    for result in results[1:]:
        pd.testing.assert_frame_equal(result.pairs, results[0].pairs)
        pd.testing.assert_frame_equal(result.duplicates, results[0].duplicates)
    assert (results[0].pairs["similarity"] >= threshold).all()
    assert len(results[0].pairs) == int((reference.pairs["similarity"] >= threshold).sum())


def test_screening_margin_covers_the_rounding_of_bfloat16():
    # near-duplicate unit vectors: the bfloat16 product may differ from float64 by at most the margin
    rng = np.random.default_rng(3)
    base = unit_rows(rng, 2000, 768).astype(np.float64)
    near = np.stack([rotate(b, d, c) for b, d, c in zip(base, rng.standard_normal((2000, 768)), rng.uniform(0.98, 1.0, 2000))])
    screened = (torch.from_numpy(base.astype(np.float32)).bfloat16() @ torch.from_numpy(near).bfloat16().T).diagonal()
    exact = np.einsum("ij,ij->i", base, near.astype(np.float64))
    margin = screen_margin(torch.bfloat16, 768)
    assert np.abs(screened.double().numpy() - exact).max() < margin


def test_survivor_of_a_pair_is_the_smallest_shard_then_key():
    rng = np.random.default_rng(4)
    base, direction = unit_rows(rng, 2, 32)
    embeddings = np.stack([rotate(base, direction, 0.995), base, unit_rows(rng, 1, 32)[0]])
    # shard orders before key: ("s1", "z") < ("s2", "a")
    result = deduplicate(embeddings, ["a", "z", "m"], ["s2", "s1", "s3"])
    assert result.duplicates.to_dict("records") == [
        {"key": "a", "shard": "s2", "duplicate_of": "z", "duplicate_of_shard": "s1", "similarity": pytest.approx(0.995, abs=1e-6)}
    ]
    assert result.kept.to_dict("records") == [{"key": "z", "shard": "s1"}, {"key": "m", "shard": "s3"}]


def test_survivor_of_a_chain_is_its_middle_and_ends_report_their_similarity_to_it():
    rng = np.random.default_rng(5)
    base, direction = unit_rows(rng, 2, 32).astype(np.float64)
    direction -= (direction @ base) * base
    direction /= np.linalg.norm(direction)
    step = np.arccos(0.993)
    chain = np.stack([np.cos(k * step) * base + np.sin(k * step) * direction for k in range(5)]).astype(np.float32)
    key, shard = identifiers(5)
    result = deduplicate(chain, key, shard, include_pairs=True)
    # only neighbours are similar enough (cos 2t = 0.972), yet the chain is one group kept by its middle
    assert len(result.pairs) == 4
    assert result.kept["key"].tolist() == ["k0002"]
    similarity = dict(zip(result.duplicates["key"], result.duplicates["similarity"]))
    assert similarity["k0001"] == pytest.approx(0.993, abs=1e-6) and similarity["k0003"] == pytest.approx(0.993, abs=1e-6)
    assert similarity["k0000"] == pytest.approx(np.cos(2 * step), abs=1e-6)
    assert similarity["k0000"] < THRESHOLD
    assert set(result.duplicates["duplicate_of"]) == {"k0002"}


def test_survivor_of_a_star_is_its_hub_and_exact_copies_keep_the_first():
    rng = np.random.default_rng(6)
    hub, *directions = unit_rows(rng, 5, 64)
    star = np.stack([rotate(hub, direction, 0.996) for direction in directions] + [hub])
    copies = np.repeat(unit_rows(rng, 1, 64), 3, axis=0)
    embeddings = np.concatenate([star, copies])
    key = ["a", "b", "c", "d", "e", "x3", "x1", "x2"]
    result = deduplicate(embeddings, key, ["s"] * 8, similarity_threshold=0.98)
    assert set(result.kept["key"]) == {"e", "x1"}
    survivor = dict(zip(result.duplicates["key"], result.duplicates["duplicate_of"]))
    assert survivor == {"a": "e", "b": "e", "c": "e", "d": "e", "x2": "x1", "x3": "x1"}
    copies_similarity = result.duplicates.set_index("key").loc[["x2", "x3"], "similarity"]
    assert (copies_similarity == 1.0).all()


def test_survivors_of_large_groups_streamed_in_passes_match(small, monkeypatch):
    reference = deduplicate(small.embeddings, small.key, small.shard, method="exact")
    monkeypatch.setattr(tasks.dedup.groups, "_SURVIVOR_ROWS", 3)
    streamed = deduplicate(small.embeddings, small.key, small.shard, method="exact")
    pd.testing.assert_frame_equal(streamed.kept, reference.kept)
    pd.testing.assert_frame_equal(streamed.duplicates, reference.duplicates, check_exact=False, atol=1e-12)


def test_threshold_is_inclusive_to_the_last_bit():
    rng = np.random.default_rng(8)
    base, direction, other = unit_rows(rng, 3, 16)
    embeddings = np.stack([base, rotate(base, direction, 0.99), other])
    key, shard = identifiers(3)
    similarity = deduplicate(embeddings, key, shard, similarity_threshold=0.98, include_pairs=True).pairs["similarity"].item()
    at = deduplicate(embeddings, key, shard, similarity_threshold=similarity, include_pairs=True)
    above = deduplicate(embeddings, key, shard, similarity_threshold=float(np.nextafter(similarity, 2.0)), include_pairs=True)
    assert at.pairs["similarity"].tolist() == [similarity] and len(at.duplicates) == 1
    assert above.pairs.empty and above.duplicates.empty and len(above.kept) == 3


def test_threshold_one_groups_identical_embeddings_only():
    rng = np.random.default_rng(9)
    rows = unit_rows(rng, 3, 768)
    embeddings = np.stack([rows[0], rows[0] * 4.0, rotate(rows[0], rows[1], 0.999999), rows[2]])
    key, shard = identifiers(4)
    result = deduplicate(embeddings, key, shard, similarity_threshold=1.0, include_pairs=True)
    # a scaled copy has cosine exactly 1; a vector a hair away does not
    assert result.pairs[["key_a", "key_b", "similarity"]].to_dict("records") == [{"key_a": "k0000", "key_b": "k0001", "similarity": 1.0}]
    assert result.kept["key"].tolist() == ["k0000", "k0002", "k0003"]


def test_missing_and_zero_embeddings_are_skipped_and_never_matched():
    rng = np.random.default_rng(10)
    rows = unit_rows(rng, 4, 32)
    embeddings = np.stack([rows[0], rows[0], rows[1], rows[2], rows[3], rows[3]])
    embeddings[2, 5] = np.nan
    embeddings[3] = np.nan
    embeddings[4] = 0.0
    embeddings[5] = 0.0
    embeddings = np.concatenate([embeddings, np.full((1, 32), np.inf, dtype=np.float32), np.full((1, 32), np.nan, dtype=np.float32)])
    key, shard = identifiers(8)
    result = deduplicate(embeddings, key, shard, include_pairs=True)
    assert result.skipped.to_dict("records") == [
        {"key": "k0002", "shard": "shard-0.tar", "reason": MISSING_REASON},
        {"key": "k0003", "shard": "shard-0.tar", "reason": MISSING_REASON},
        {"key": "k0004", "shard": "shard-0.tar", "reason": ZERO_REASON},
        {"key": "k0005", "shard": "shard-0.tar", "reason": ZERO_REASON},
        {"key": "k0006", "shard": "shard-0.tar", "reason": MISSING_REASON},
        {"key": "k0007", "shard": "shard-0.tar", "reason": MISSING_REASON},
    ]
    assert list(result.skipped.columns) == SKIPPED_COLUMNS
    assert result.pairs[["key_a", "key_b"]].values.tolist() == [["k0000", "k0001"]]
    assert result.kept["key"].tolist() == ["k0000"]
    assert result.stats.rows == 8 and result.stats.compared_rows == 2 and result.stats.skipped_rows == 6


@pytest.mark.parametrize("method", ["auto", "exact", "clustered"])
@pytest.mark.parametrize("num_rows", [0, 1])
def test_empty_and_single_inputs(method, num_rows):
    embeddings = unit_rows(np.random.default_rng(11), num_rows, 8)
    key, shard = identifiers(num_rows)
    result = deduplicate(embeddings, key, shard, method=method, include_pairs=True)
    assert result.duplicates.empty and list(result.duplicates.columns) == DUPLICATE_COLUMNS
    assert result.pairs.empty and list(result.pairs.columns) == PAIR_COLUMNS
    assert result.skipped.empty and list(result.skipped.columns) == SKIPPED_COLUMNS
    assert result.kept["key"].tolist() == key
    assert result.stats.groups == 0 and result.stats.duplicates == 0


def test_non_normalised_embeddings_are_compared_by_cosine(small):
    scale = np.random.default_rng(12).uniform(0.1, 10.0, size=(len(small.key), 1)).astype(np.float32)
    reference = deduplicate(small.embeddings, small.key, small.shard)
    scaled = deduplicate(small.embeddings * scale, small.key, small.shard)
    pd.testing.assert_frame_equal(scaled.kept, reference.kept)
    pd.testing.assert_frame_equal(scaled.duplicates, reference.duplicates, check_exact=False, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e, k, s: (e.astype(np.float64), k, s), "must be float32"),
        (lambda e, k, s: (e[0], k, s), "must be 2-D"),
        (lambda e, k, s: (e[None], k, s), "must be 2-D"),
        (lambda e, k, s: (e.tolist(), k, s), "must be a numpy float32 array"),
        (lambda e, k, s: (e, k[:-1], s), "key has 4 entries but embeddings have 5 rows"),
        (lambda e, k, s: (e, k, s + ["extra"]), "shard has 6 entries but embeddings have 5 rows"),
        (lambda e, k, s: (e, [None] + k[1:], s), "key is missing at row 0"),
        (lambda e, k, s: (e, ["same"] * 5, s), r"\('shard-0.tar', 'same'\) appears 5 times"),
        (lambda e, k, s: (np.zeros((5, 0), dtype=np.float32), k, s), "dimension 0"),
    ],
)
def test_bad_input_gets_a_clear_error(change, message):
    embeddings = unit_rows(np.random.default_rng(13), 5, 8)
    key, shard = identifiers(5)
    with pytest.raises(UserError, match=message):
        deduplicate(*change(embeddings, key, shard))


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"similarity_threshold": 0.0}, r"similarity_threshold must be in \(0, 1\]"),
        ({"similarity_threshold": 1.5}, r"similarity_threshold must be in \(0, 1\]"),
        ({"similarity_threshold": float("nan")}, r"similarity_threshold must be in \(0, 1\]"),
        ({"similarity_threshold": "high"}, r"similarity_threshold must be in \(0, 1\]"),
        ({"method": "fast"}, "method must be one of auto, exact, clustered"),
        ({"clusters_per_point": 0}, "clusters_per_point must be at least 1"),
        ({"num_clusters": 0}, "num_clusters must be at least 1"),
        ({"matmul_dtype": "int8"}, "matmul_dtype must be one of"),
        ({"device": "no-such-device"}, "is not a torch device"),
        ({"block_entries": 0}, "block_entries must be at least 1"),
    ],
)
def test_bad_options_get_a_clear_error(option, message):
    embeddings = unit_rows(np.random.default_rng(14), 5, 8)
    key, shard = identifiers(5)
    with pytest.raises(UserError, match=message):
        deduplicate(embeddings, key, shard, **option)
