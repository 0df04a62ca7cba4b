"""The Location value: one place in storage with the options that reach it, never showing credentials."""

from __future__ import annotations

import pickle

import pytest

from tasks.errors import UserError
from tasks.io.locations import Location, as_location, resolve_url_credentials

SECRET = {"key": "AKIAEXAMPLEKEY", "secret": "hunter2-secret", "client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}}


def test_str_and_repr_show_the_url_alone_and_derived_locations_keep_the_options():
    location = Location("s3://bucket/out", SECRET)
    for shown in (str(location), repr(location), repr(location / "shards"), repr(location.at("s3://bucket/in/a.tar"))):
        assert "AKIAEXAMPLEKEY" not in shown and "hunter2" not in shown
    assert str(location / "shards") == "s3://bucket/out/shards" and str(location.join("a", "b.tar")) == "s3://bucket/out/a/b.tar"
    assert (location / "shards").storage_options == SECRET and location.at("s3://other/x").storage_options == SECRET
    # What a task on another machine receives: the same place, reached the same way.
    assert pickle.loads(pickle.dumps(location)) == location and pickle.loads(pickle.dumps(location)).storage_options == SECRET
    assert Location(location) == location and Location(location, {}).storage_options == {}


def test_immutable_and_equal_by_url_and_options():
    location = Location("/data/in")
    with pytest.raises(AttributeError):
        location.url = "/elsewhere"  # type: ignore[misc]
    assert location == as_location("/data/in") and location != Location("/data/in", {"anon": True})
    assert len({location, Location("/data/in")}) == 1
    returned = location.storage_options
    returned["anon"] = True
    assert location.storage_options == {}  # a copy: nobody changes the options of a shared location


def test_credentials_in_a_url_never_make_a_location():
    with pytest.raises(ValueError, match="carries no credentials"):
        Location("s3://AKIA:secret@bucket/x")
    clean, options = resolve_url_credentials("s3://AKIA:s3cret@bucket/x")
    assert str(Location(clean, options)) == "s3://bucket/x" and options == {"key": "AKIA", "secret": "s3cret"}
    with pytest.raises(UserError, match="non-empty"):
        Location("")


def test_unknown_protocol_is_one_sentence(tmp_path):
    with pytest.raises(UserError, match="unknown protocol 'nosuch://'"):
        Location("nosuch://bucket/x").filesystem()
    fs, path = Location(str(tmp_path)).filesystem()
    assert fs.isdir(path)


def test_the_plan_stages_show_no_credentials(tmp_path):
    """Every stage value a task receives shows URLs only, though it carries the run's options."""
    from tasks.filter.plan import EmbedStage, FilterStage
    from tasks.io.read import DecodeOptions
    from tasks.store.entries import EmbeddingStore
    from tests.support.tiny_clip import make_tiny_clip
    from tasks.models.clip_resolve import resolve_clip

    config, checkpoint = make_tiny_clip(tmp_path / "clip", embed_dim=768)
    weights = resolve_clip(str(config), str(checkpoint))
    store = EmbeddingStore(Location("s3://bucket/cache", SECRET))
    embed = EmbedStage.of(weights, store, DecodeOptions(), inputs=Location("s3://bucket/in", SECRET))
    scoring = FilterStage(embed, Location("s3://bucket/head.safetensors", SECRET), "0" * 64, Location("s3://bucket/out", SECRET), 0.5, 100)
    shown = repr(scoring) + repr(embed) + str(embed.shard("s3://bucket/in/a.tar"))
    assert "hunter2" not in shown and "AKIAEXAMPLEKEY" not in shown
    assert embed.shard("s3://bucket/in/a.tar").storage_options == SECRET and scoring.output.storage_options == SECRET
