"""The catalog's names and keys, without a store or torch (farm/catalog.py, farm/models.py)."""

from __future__ import annotations

import pytest

from farm import catalog, keys, models
from farm.errors import ValidationError


@pytest.mark.parametrize("ref", ["sdxl-base", "my_model.v2", "sdxl-base@3",
                                 "sha256:" + "ab" * 6, "sha256:" + "0" * 64])
def test_catalog_references_resolve_as_store_models(ref: str) -> None:
    assert catalog.is_ref(ref) or ref in models.REGISTRY
    spec = models.resolve(ref) if ref not in models.REGISTRY else None
    if spec is not None:
        assert (spec.source, spec.ref, spec.role) == ("store", ref, "base")


@pytest.mark.parametrize("ref", ["SDXL", "a b", "x@", "x@v1", "sha256:abc", "-lead",
                                 "models/x.safetensors", "https://x.example/m"])
def test_what_is_not_a_catalog_reference_is_refused(ref: str) -> None:
    assert not catalog.is_ref(ref)
    with pytest.raises(ValidationError):
        models.resolve(ref)


def test_known_names_stay_what_they_were() -> None:
    assert models.resolve("sdxl-base").source == "hub"
    assert models.resolve("tiny-sdxl").source == "tiny"
    assert models.resolve("/models/x.safetensors").source == "path"


def test_the_unknown_rule_names_what_the_catalog_holds() -> None:
    assert "or an absolute local path" in models.unknown_rule()
    assert "catalog (it holds: a@1, b@2)" in models.unknown_rule("a@1, b@2")


def test_manifest_keys_are_built_and_parsed_in_one_place() -> None:
    assert keys.blob_key("ab" * 32) == f"models/blobs/sha256/{'ab' * 32}"
    key = keys.model_manifest_key("sdxl-base", 12)
    assert key == "models/manifests/sdxl-base/12.json"
    assert keys.model_manifest_ref(key) == ("sdxl-base", 12)
    assert keys.model_manifest_ref("models/manifests/sdxl-base/latest.json") is None
    assert keys.model_manifest_ref("batches/b/manifest.json") is None


def test_push_names_are_checked_with_the_rule() -> None:
    with pytest.raises(ValidationError, match="--name must be 1-64 lowercase"):
        catalog.check_name("SDXL Base")
