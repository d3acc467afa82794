"""The store contract, the same for a directory and for S3 over HTTP (moto's server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from farm.errors import AlreadyExists, ConfigError, NotFound, StoreUnavailable
from farm.settings import Settings
from farm.store import FileStore, S3Store, Store, get_json, open_store, put_json


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "file":
        return FileStore(tmp_path / "store")
    env = request.getfixturevalue("s3_env")
    return open_store(Settings.load(env=env))


def test_put_get_roundtrip_and_overwrite(store: Store) -> None:
    store.put("batches/b1/jobs/j1.json", b"one")
    assert store.get("batches/b1/jobs/j1.json") == b"one"
    store.put("batches/b1/jobs/j1.json", b"two")
    assert store.get("batches/b1/jobs/j1.json") == b"two"


def test_create_once_refuses_a_second_write_and_keeps_the_first(store: Store) -> None:
    store.put("batches/b1/images/a.png", b"first", create_once=True)
    with pytest.raises(AlreadyExists):
        store.put("batches/b1/images/a.png", b"second", create_once=True)
    assert store.get("batches/b1/images/a.png") == b"first"


def test_missing_key_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        store.get("batches/nope/manifest.json")
    assert not store.exists("batches/nope/manifest.json")


def test_list_and_list_dirs(store: Store) -> None:
    for key in ("batches/b1/manifest.json", "batches/b1/jobs/x.json", "batches/b2/manifest.json"):
        store.put(key, b"{}")
    assert store.list_keys("batches/b1/") == ["batches/b1/jobs/x.json", "batches/b1/manifest.json"]
    assert store.list_keys("batches/b1") == ["batches/b1/jobs/x.json", "batches/b1/manifest.json"]
    assert store.list_dirs("batches") == ["b1", "b2"]
    assert store.list_keys("batches/none/") == []


def test_delete_and_json_helpers(store: Store) -> None:
    put_json(store, "batches/b1/x.json", {"a": [1, 2]})
    assert get_json(store, "batches/b1/x.json") == {"a": [1, 2]}
    store.delete("batches/b1/x.json")
    assert not store.exists("batches/b1/x.json")
    store.delete("batches/b1/x.json")  # deleting twice is fine


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a/../b", "a//b", "", "a/./b"])
def test_keys_never_climb_out_of_the_store(store: Store, key: str) -> None:
    with pytest.raises(ValueError):
        store.put(key, b"x")


def test_s3_prefix_keeps_keys_under_it(s3_env: dict[str, str]) -> None:
    import boto3

    store = open_store(Settings.load(env=s3_env))
    assert isinstance(store, S3Store)
    store.put("batches/b9/manifest.json", b"{}")
    client = boto3.client("s3", endpoint_url=s3_env["FARM_S3_ENDPOINT_URL"],
                          region_name="us-east-1")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=store.bucket)["Contents"]]
    assert keys == ["renders/batches/b9/manifest.json"]


def test_s3_unreachable_endpoint_is_store_unavailable(tmp_path: Path) -> None:
    settings = Settings.load(env={"FARM_HOME": str(tmp_path), "FARM_STORE_URL": "s3://b/p",
                                  "FARM_S3_ENDPOINT_URL": "http://127.0.0.1:9"})
    store = open_store(settings)
    assert isinstance(store, S3Store)
    store.client.meta.config.retries = {"max_attempts": 1}
    with pytest.raises(StoreUnavailable, match="object store"):
        store.get("batches/x/manifest.json")


def test_s3_missing_bucket_is_a_config_error(s3_env: dict[str, str]) -> None:
    env = {**s3_env, "FARM_STORE_URL": "s3://no-such-bucket-here/x"}
    with pytest.raises(ConfigError, match="bucket"):
        open_store(Settings.load(env=env)).put("batches/a/b.json", b"{}")


@pytest.mark.parametrize("url", ["ftp://x/y", "s3://", "file://host/path"])
def test_bad_store_urls_are_config_errors(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError, match="FARM_STORE_URL"):
        open_store(Settings.load(env={"FARM_HOME": str(tmp_path), "FARM_STORE_URL": url}))
