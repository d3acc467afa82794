"""The fleet model store: push into the farm's store (a folder, and S3 over HTTP through moto's
server), pull into a machine's cache, and what goes wrong on the way (farm/catalog.py,
farm/blobs.py, worker/push.py, worker/model_cache.py)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from farm import blobs, catalog, keys, models
from farm.errors import IntegrityError, UsageError, ValidationError
from farm.jobs import JobSpec
from farm.settings import Settings
from farm.store import Store, open_store
from farm.worker import pipelines, tiny
from farm.worker.model_cache import ModelCache
from farm.worker.push import push
from tests.conftest import run_farm


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("src") / "tiny-sdxl"
    tiny.build_tiny("tiny-sdxl", folder)
    return folder


@pytest.fixture(params=["file", "s3"])
def store_env(request: pytest.FixtureRequest, env: dict[str, str]) -> dict[str, str]:
    if request.param == "file":
        return env
    s3: dict[str, str] = request.getfixturevalue("s3_env")
    return s3


def _settings(env: dict[str, str], **changes: Any) -> Settings:
    return Settings.load(env=env, threads=1).replace(**changes)


def _pixels(model: Any, settings: Settings) -> str:
    spec = JobSpec.from_dict({"prompt": "a red fox", "seed": 11, "steps": 3, "width": 128,
                              "height": 128}, settings)
    return pipelines.pixels_digest(pipelines.render(model, spec))


def test_push_pull_round_trip_renders_what_a_local_fp16_folder_renders(
        store_env: dict[str, str], tiny_folder: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # a local folder's optional tiny VAE would come from the Hub: not what this test is about
    monkeypatch.setattr(pipelines, "_optional_tiny_vae", lambda *a: None)
    settings = _settings(store_env)
    store = open_store(settings)
    lines: list[str] = []
    first = push(store, str(tiny_folder), "tiny", echo=lines.append)
    assert (first.ref, first.variant, first.role) == ("tiny@1", "fp16", "base")
    assert "fp32 tensors stored as fp16" in first.slimming
    assert first.dtypes["unet"] == ["float16"]
    for f in first.files:  # content-addressed: each file's blob holds its bytes
        assert blobs.blob_size(store, f.sha256) == f.size
    # a second push of the same source sends no blob again, and is the next version
    second = push(store, str(tiny_folder), "tiny", echo=lines.append)
    assert second.ref == "tiny@2" and [f.sha256 for f in second.files] == \
        [f.sha256 for f in first.files]
    assert "uploaded 0 new blobs" in lines[-1]
    assert catalog.find(store, "tiny").ref == "tiny@2"
    assert catalog.find(store, f"sha256:{first.digest[:16]}").ref == "tiny@1"

    # a worker pulls it (a catalog name) and renders the pixels of diffusers' own fp16 cast
    model = pipelines.load_model(models.resolve("tiny@1"), settings, "cpu")
    assert model.catalog == {"name": "tiny", "version": 1, "variant": "fp16",
                             "manifest": first.digest}
    from diffusers import StableDiffusionXLPipeline

    local = tmp_path / "local-fp16"
    StableDiffusionXLPipeline.from_pretrained(tiny_folder, dtype=torch.float16) \
        .save_pretrained(local)
    from_folder = pipelines.load_model(models.resolve(str(local)), settings, "cpu")
    assert _pixels(model, settings) == _pixels(from_folder, settings)


def test_fp8_variant_stores_the_unet_in_fp8_and_loads_with_layerwise_casting(
        env: dict[str, str], tiny_folder: Path) -> None:
    settings = _settings(env)
    store = open_store(settings)
    fp16 = push(store, str(tiny_folder), "tiny", echo=lambda _: None)
    fp8 = push(store, str(tiny_folder), "tiny", "fp8", echo=lambda _: None)
    assert fp8.dtypes["unet"] == ["float16", "float8_e4m3fn"]
    assert fp8.bytes_after["unet"] <= 0.55 * fp16.bytes_after["unet"]
    # only the UNet differs between the variants
    differ = {f.path for f in fp8.files} ^ set() and \
        {f.path for f in fp8.files if f.sha256 not in {g.sha256 for g in fp16.files}}
    assert differ == {"unet/diffusion_pytorch_model.safetensors"}
    model = pipelines.load_model(models.resolve("tiny@2"), settings, "cpu")
    assert model.pipe.unet.conv_in.weight.dtype == torch.float8_e4m3fn
    assert model.pipe.unet.conv_norm_out.weight.dtype == torch.float32  # norms not cast
    # a worker whose profile stores fp8 prefers the fp8 variant of a bare name
    cache = ModelCache(settings, echo=lambda _: None)
    assert cache.manifest(store, "tiny", "fp8")[0].ref == "tiny@2"
    assert cache.manifest(store, "tiny", "fp16")[0].ref == "tiny@1"


def test_a_corrupt_blob_fetched_twice_stops_the_pull(env: dict[str, str],
                                                     tiny_folder: Path) -> None:
    settings = _settings(env)
    store = open_store(settings)
    manifest = push(store, str(tiny_folder), "tiny", echo=lambda _: None)
    victim = max(manifest.files, key=lambda f: f.size)
    data = bytearray(store.get(keys.blob_key(victim.sha256)))
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    store.put(keys.blob_key(victim.sha256), bytes(data))
    lines: list[str] = []
    with pytest.raises(IntegrityError, match="failed its hash check twice") as err:
        ModelCache(settings, echo=lines.append).pull(store, "tiny")
    assert "\n" not in str(err.value) and victim.sha256 in str(err.value)
    assert sum("fetching it again" in line for line in lines) == 1
    blob_dir = settings.model_cache_path / "blobs"
    assert not (blob_dir / victim.sha256).exists()  # nothing half-written kept
    assert not [p for p in blob_dir.iterdir() if p.name.startswith(".tmp-")]


def test_a_truncated_or_rewritten_cached_file_is_fetched_again(env: dict[str, str],
                                                               tiny_folder: Path) -> None:
    settings = _settings(env)
    store = open_store(settings)
    manifest = push(store, str(tiny_folder), "tiny", echo=lambda _: None)
    cache_lines: list[str] = []
    cache = ModelCache(settings, echo=cache_lines.append)
    first = cache.pull(store, "tiny")
    first.release()
    assert first.fetched == len({f.sha256 for f in manifest.files})
    again = cache.pull(store, "tiny")
    again.release()
    assert again.fetched == 0
    big = max(manifest.files, key=lambda f: f.size)
    cached = settings.model_cache_path / "blobs" / big.sha256
    with open(cached, "r+b") as fh:
        fh.truncate(big.size // 3)
    third = cache.pull(store, "tiny")
    third.release()
    assert third.fetched == 1 and blobs.file_sha256(cached) == big.sha256
    assert any("truncated" in line for line in cache_lines)
    # same size, other bytes (written since it was checked): hashed again, fetched again
    data = bytearray(cached.read_bytes())
    data[0] ^= 0xFF
    cached.write_bytes(bytes(data))
    fourth = cache.pull(store, "tiny")
    fourth.release()
    assert fourth.fetched == 1 and blobs.file_sha256(cached) == big.sha256
    assert any("corrupt" in line for line in cache_lines)


def test_the_cache_stays_within_its_budget_least_recently_used_first(
        env: dict[str, str], tiny_folder: Path, models_dir: Path) -> None:
    settings = _settings(env)
    store = open_store(settings)
    refiner = models_dir / "tiny-sdxl-refiner"
    tiny.build_tiny("tiny-sdxl-refiner", refiner)
    base = push(store, str(tiny_folder), "base", echo=lambda _: None)
    other = push(store, str(refiner), "refiner", echo=lambda _: None)
    assert other.role == "refiner"
    shared = {f.sha256 for f in base.files} & {f.sha256 for f in other.files}
    # room for either model, not both
    budget = max(base.size, other.size) + min(base.size, other.size) // 2
    small = settings.replace(model_cache_gb=budget / 1e9)
    lines: list[str] = []
    cache = ModelCache(small, echo=lines.append)
    cache.pull(store, "base").release()
    cache.pull(store, "refiner").release()
    assert cache.usage() <= budget
    assert any("least recently used" in line for line in lines)
    held = {p.name for p in (small.model_cache_path / "blobs").iterdir()
            if not p.name.endswith(".ok")}
    assert {f.sha256 for f in other.files} <= held  # the model in use is never evicted
    assert not ({f.sha256 for f in base.files} - shared) <= held
    # a model bigger than the whole budget is refused with the setting's name
    with pytest.raises(UsageError, match="FARM_MODEL_CACHE_GB"):
        ModelCache(settings.replace(model_cache_gb=1e-6)).pull(store, "base")


def test_two_workers_pulling_one_model_download_it_once(
        env: dict[str, str], tiny_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(env)
    store = open_store(settings)
    manifest = push(store, str(tiny_folder), "tiny", echo=lambda _: None)
    real_fetch = blobs.fetch
    fetched: list[str] = []
    first_in, go_on = threading.Event(), threading.Event()

    def held_fetch(store: Store, digest: str, *args: Any, **kwargs: Any) -> None:
        fetched.append(digest)
        if not first_in.is_set():  # the first download waits until the second worker queues
            first_in.set()
            assert go_on.wait(30)
        real_fetch(store, digest, *args, **kwargs)

    monkeypatch.setattr(blobs, "fetch", held_fetch)
    second_waits = threading.Event()

    def echo_b(line: str) -> None:
        if line.startswith("waiting for another process"):
            second_waits.set()

    results: dict[str, Any] = {}

    def pull(name: str, echo: Any) -> None:
        pulled = ModelCache(settings, echo=echo).pull(store, "tiny")
        pulled.release()
        results[name] = pulled

    a = threading.Thread(target=pull, args=("a", lambda _: None))
    a.start()
    assert first_in.wait(30)
    b = threading.Thread(target=pull, args=("b", echo_b))
    b.start()
    assert second_waits.wait(30)  # B is queued behind A's lock, not downloading
    go_on.set()
    a.join(60)
    b.join(60)
    distinct = {f.sha256 for f in manifest.files}
    assert sorted(fetched) == sorted(distinct)  # each blob once, for both workers
    assert results["a"].fetched + results["b"].fetched == len(distinct)
    assert results["a"].folder == results["b"].folder


def test_a_folder_another_worker_made_meanwhile_is_left_alone(
        env: dict[str, str], tiny_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers both find no folder; one moves its folder in first. The second must keep
    it (the first may be loading from it), not replace it."""
    from farm.worker import model_cache

    settings = _settings(env)
    store = open_store(settings)
    push(store, str(tiny_folder), "tiny", echo=lambda _: None)
    first = ModelCache(settings, echo=lambda _: None).pull(store, "tiny")
    inode = first.folder.stat().st_ino
    real, looks = model_cache._complete, []

    def not_yet_at_first(manifest: Any, folder: Path) -> bool:
        looks.append(folder)
        return len(looks) > 1 and real(manifest, folder)  # the second worker's first look

    monkeypatch.setattr(model_cache, "_complete", not_yet_at_first)
    second = ModelCache(settings, echo=lambda _: None).pull(store, "tiny")
    assert len(looks) >= 2 and second.folder == first.folder
    assert first.folder.stat().st_ino == inode  # the same folder, never removed
    assert not list(first.folder.parent.glob(".tmp-*"))
    # a folder with a broken link (its blob evicted) is replaced
    monkeypatch.setattr(model_cache, "_complete", real)
    first.release()
    second.release()
    victim = next(p for p in first.folder.rglob("*") if p.is_symlink())
    victim.unlink()
    victim.symlink_to(first.folder / "no-such-blob")
    third = ModelCache(settings, echo=lambda _: None).pull(store, "tiny")
    assert real(third.manifest, third.folder) and third.folder.stat().st_ino != inode
    third.release()


def test_pickle_checkpoints_are_refused(env: dict[str, str], tmp_path: Path,
                                        tiny_folder: Path) -> None:
    store = open_store(_settings(env))
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not even read")
    with pytest.raises(UsageError, match=r"pickle checkpoints .* run code when loaded; "
                                         r"convert it to \.safetensors") as err:
        push(store, str(ckpt), "bad")
    assert "\n" not in str(err.value)
    # a folder whose UNet has only a pickle file
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_folder, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(UsageError, match="run code when loaded"):
        push(store, str(folder), "bad")
    assert catalog.refs(store) == [] and store.list_keys(keys.MODELS) == []


def test_submit_refuses_a_model_the_catalog_does_not_hold(env: dict[str, str],
                                                          tiny_folder: Path) -> None:
    settings = _settings(env)
    store = open_store(settings)
    from farm.scheduler.parse import parse_batch

    # no catalog: the allow-list's message
    with pytest.raises(ValidationError, match="must be one of .* or an absolute local path"):
        parse_batch('{"prompt": "a", "model": "nope"}\n', "jsonl", {}, settings)
    push(store, str(tiny_folder), "tiny", echo=lambda _: None)
    specs = parse_batch('{"prompt": "a", "model": "tiny@1", "width": 1024, "height": 1024}\n',
                        "jsonl", {}, settings)
    assert specs[0].model == "tiny@1"
    result = run_farm(env, "submit", "-", "--model", "nope", input="a red fox\n")
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert line.count("\n") == 0 and "'nope'" in line and "tiny@1" in line and "model" in line


def test_a_worker_with_the_model_cached_loads_it_with_no_network(
        s3_env: dict[str, str], tiny_folder: Path) -> None:
    settings = _settings(s3_env)
    push(open_store(settings), str(tiny_folder), "tiny", echo=lambda _: None)
    online = pipelines.load_model(models.resolve("tiny"), settings, "cpu")
    # the store's endpoint now answers nothing (a closed port) and the Hub is off
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    offline = settings.replace(s3_endpoint_url=dead, store_retry_seconds=0.0)
    lines: list[str] = []
    cache = ModelCache(offline, echo=lines.append)
    pulled = cache.pull(open_store(offline), "tiny")
    pulled.release()
    assert pulled.offline and pulled.fetched == 0
    assert any("store unreachable" in line for line in lines)
    model = pipelines.load_model(models.resolve("tiny"), offline, "cpu")
    assert model.catalog == online.catalog
    assert _pixels(model, offline) == _pixels(online, settings)


def test_manifest_decode_names_what_is_wrong() -> None:
    good = {"format": 1, "name": "x", "version": 1, "variant": "fp16", "role": "base",
            "layout": "diffusers", "files": [{"path": "unet/a.safetensors", "size": 1,
                                               "sha256": "0" * 64}],
            "components": {}, "dtypes": {}, "source": "s", "revision": "r", "slimming": [],
            "bytes_before": {}, "bytes_after": {}}
    assert catalog.ModelManifest.decode(json.loads(json.dumps(good))).ref == "x@1"
    bad = {**good, "files": [{"path": "../etc/passwd", "size": 1, "sha256": "0" * 64}]}
    with pytest.raises(IntegrityError, match="relative path inside the model"):
        catalog.ModelManifest.decode(bad)
    with pytest.raises(IntegrityError, match="variant must be one of fp16, fp8"):
        catalog.ModelManifest.decode({**good, "variant": "int4"})


def test_push_takes_a_hub_id_from_the_local_hugging_face_cache(env: dict[str, str],
                                                               tiny_folder: Path,
                                                               tmp_path: Path) -> None:
    import shutil

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "models--acme--tiny-sdxl"
    shutil.copytree(tiny_folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    hub_env = {**env, "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    pushed = run_farm(hub_env, "models", "push", "acme/tiny-sdxl", "--json")
    assert pushed.returncode == 0, pushed.stderr
    manifest = json.loads(pushed.stdout)
    assert (manifest["name"], manifest["source"], manifest["revision"]) == \
        ("tiny-sdxl", "acme/tiny-sdxl", revision)
    missing = run_farm(hub_env, "models", "push", "acme/not-here")
    assert missing.returncode == 2
    assert "not in the local Hugging Face cache" in missing.stderr
    assert "hf download acme/not-here" in missing.stderr
    listed = run_farm(hub_env, "models", "ls", "--json")
    assert [m["ref"] for m in json.loads(listed.stdout)] == ["tiny-sdxl@1"]
    removed = run_farm(hub_env, "models", "rm", "tiny-sdxl", "--json")
    assert json.loads(removed.stdout)["removed"] == ["tiny-sdxl@1"]
    assert open_store(_settings(env)).list_keys(keys.MODELS) == []


# fp8 against fp16 weights, the same tiny-VAE profile, 128x128, 3 steps, CPU (per RGB channel,
# 0-255): measured mean 0.11-0.14 and max 2-3 levels over seeds 11-14 (docs/models.md); a mean
# above 1 level or any value off by more than 16 would be a broken cast, not fp8 rounding.
FP8_MEAN_BOUND, FP8_MAX_BOUND = 1.0, 16


def _image(model: Any, settings: Settings) -> Any:
    import numpy as np

    spec = JobSpec.from_dict({"prompt": "a red fox", "seed": 11, "steps": 3, "width": 128,
                              "height": 128}, settings)
    return np.array(pipelines.render(model, spec)[0]).astype(int)


def test_a_6gb_worker_loads_the_fp8_variant_and_casts_16_bit_models_to_fp8(
        env: dict[str, str], tiny_folder: Path) -> None:
    from farm import vram

    settings = _settings(env)
    store = open_store(settings)
    push(store, str(tiny_folder), "tiny", echo=lambda _: None)
    fp8 = push(store, str(tiny_folder), "tiny", "fp8", echo=lambda _: None)
    newest = push(store, str(tiny_folder), "tiny", echo=lambda _: None)  # fp16, tiny@3
    six, eight = vram.profile_for(6), vram.profile_for(8)
    assert six.name == "lean-fp8" and eight.name == "lean"  # both decode with the tiny VAE

    # the load plan of a 6 GB worker: a bare name gives the newest fp8 version, held in fp8
    # (its tiny VAE the one pushed with the model: nothing from the Hub)
    small = pipelines.load_model(models.resolve("tiny"), settings, "cpu", six)
    assert small.catalog is not None
    assert (small.catalog["version"], small.catalog["variant"]) == (2, "fp8")
    assert small.catalog["manifest"] == fp8.digest
    assert (small.profile, small.vae_name) == ("lean-fp8", "tiny")
    linear = next(m for m in small.pipe.unet.modules() if isinstance(m, torch.nn.Linear))
    assert linear.weight.dtype == torch.float8_e4m3fn
    # a 16-bit version it is told to load (name@version) is cast to fp8 as it loads: the same
    # weights in memory, the same pixels
    cast = pipelines.load_model(models.resolve("tiny@3"), settings, "cpu", six)
    assert cast.catalog is not None and cast.catalog["manifest"] == newest.digest
    assert cast.pipe.unet.conv_in.weight.dtype == torch.float8_e4m3fn
    assert (_image(cast, settings) == _image(small, settings)).all()

    # an 8 GB worker takes the newest fp16 version and keeps it 16-bit (fp32 on a CPU)
    big = pipelines.load_model(models.resolve("tiny"), settings, "cpu", eight)
    assert big.catalog is not None
    assert (big.catalog["version"], big.catalog["variant"]) == (3, "fp16")
    assert big.pipe.unet.conv_in.weight.dtype == torch.float32
    diff = abs(_image(small, settings) - _image(big, settings))
    assert 0 < diff.mean() <= FP8_MEAN_BOUND and diff.max() <= FP8_MAX_BOUND, \
        (diff.mean(), diff.max())


def _vae_repo(tmp_path: Path, tiny_folder: Path, component: str) -> Path:
    """A VAE's folder as its Hub repository has it: config and weights, plus a README, a
    single-file copy of the weights and a pickle copy."""
    import shutil

    repo = tmp_path / f"hub-{component}"
    shutil.copytree(tiny_folder / component, repo)
    (repo / "README.md").write_text("a VAE\n")
    shutil.copyfile(repo / "diffusion_pytorch_model.safetensors", repo / "single.safetensors")
    (repo / "diffusion_pytorch_model.bin").write_bytes(b"never read")
    return repo


def test_the_replacement_vaes_are_pushed_once_and_loaded_from_the_catalog(
        env: dict[str, str], tiny_folder: Path, tmp_path: Path) -> None:
    from diffusers import AutoencoderKL, AutoencoderTiny, StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from farm import vram
    from farm.errors import ModelUnavailable
    from farm.scheduler.parse import parse_batch

    settings = _settings(env)
    store = open_store(settings)
    tiny_vae = push(store, str(_vae_repo(tmp_path, tiny_folder, "vae_tiny")),
                    models.VAES["tiny"].name, echo=lambda _: None)
    assert (tiny_vae.role, tiny_vae.layout, tiny_vae.components) == \
        ("vae", "component", {"vae": "AutoencoderTiny"})
    assert sorted(f.path for f in tiny_vae.files) == ["config.json",
                                                      "diffusion_pytorch_model.safetensors"]
    assert "single-file copies of the weights left out" in tiny_vae.slimming
    fix = push(store, str(_vae_repo(tmp_path, tiny_folder, "vae")),
               models.VAES["fp16-fix"].name, echo=lambda _: None)
    assert (fix.ref, fix.role, fix.components) == ("sdxl-vae-fp16-fix@1", "vae",
                                                   {"vae": "AutoencoderKL"})
    with pytest.raises(ValidationError, match="--variant must be fp16 for a VAE"):
        push(store, str(tiny_folder / "vae_tiny"), "taesdxl", "fp8", echo=lambda _: None)

    # a model with no tiny VAE of its own (a local folder) on a tiny-VAE profile takes
    # TAESD-XL from the catalog (the Hub is off in tests: HF_HUB_OFFLINE=1)
    local = tmp_path / "local"
    StableDiffusionXLPipeline.from_pretrained(tiny_folder).save_pretrained(local)
    assert not (local / "vae_tiny").exists()
    model = pipelines.load_model(models.resolve(str(local)), settings, "cpu",
                                 vram.profile_for(6))
    assert model.vae_name == "tiny" and isinstance(model.pipe.vae, AutoencoderTiny)
    pushed = load_file(tiny_folder / "vae_tiny" / "diffusion_pytorch_model.safetensors")
    name, tensor = next(iter(pushed.items()))
    assert torch.equal(model.pipe.vae.state_dict()[name], tensor.to(torch.float16).float())
    # the fp16-fix VAE (what 16-bit CUDA workers decode with) comes from the catalog as well
    fixed = pipelines._catalog_vae("fp16-fix", settings, torch.float32)
    assert isinstance(fixed, AutoencoderKL)

    # a VAE is no model a job can name
    with pytest.raises(ValidationError, match="model must be a base model; the catalog's "
                                              "taesdxl is a vae"):
        parse_batch('{"prompt": "a", "model": "taesdxl"}\n', "jsonl", {}, settings)
    # and what sits under a VAE's name must be that VAE
    push(store, str(tiny_folder / "vae"), "taesdxl", echo=lambda _: None)
    with pytest.raises(ModelUnavailable, match="must be a AutoencoderTiny VAE"):
        pipelines._catalog_vae("tiny", settings, torch.float32)


def test_a_refiner_pushed_under_a_new_name_plans_and_loads_as_a_refiner(
        env: dict[str, str], models_dir: Path, tmp_path: Path) -> None:
    import shutil

    from diffusers import StableDiffusionXLImg2ImgPipeline

    from farm.scheduler.parse import parse_batch
    from farm.scheduler.plan import plan

    settings = _settings(env)
    store = open_store(settings)
    refiner = tmp_path / "house-refiner"
    tiny.build_tiny("tiny-sdxl-refiner", models_dir / "tiny-sdxl-refiner")
    shutil.copytree(models_dir / "tiny-sdxl-refiner", refiner)
    # saved through the base pipeline's class: the role comes from the weights' configs
    index = json.loads((refiner / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (refiner / "model_index.json").write_text(json.dumps(index))
    manifest = push(store, str(refiner), "house-refiner", echo=lambda _: None)
    assert manifest.role == "refiner"

    (spec,) = parse_batch('{"prompt": "a", "refiner": "house-refiner"}\n', "jsonl", {},
                          settings)
    planned = plan(spec, settings)
    assert planned.refiner_vram_class is not None  # planned with the SDXL refiner's figures
    with pytest.raises(ValidationError, match="line 1: model must be a base model; the "
                                              "catalog's house-refiner is a refiner"):
        parse_batch('{"prompt": "a", "model": "house-refiner"}\n', "jsonl", {}, settings)
    # a worker serving it beside a base takes the pair's jobs too (split policy "never")
    from farm import queues

    roles = catalog.roles(store, ["house-refiner", "not-pushed"])
    assert roles == {"house-refiner": "refiner"}
    served = queues.routes(["tiny-sdxl", "house-refiner"], roles)
    assert models.pair_name("tiny-sdxl", "house-refiner") in served
    assert models.pair_name("tiny-sdxl", "house-refiner") not in queues.routes(
        ["tiny-sdxl", "house-refiner"])  # by its name alone it would count as a base
    # and loads the refiner's pipeline
    model = pipelines.load_model(models.resolve("house-refiner"), settings, "cpu")
    assert model.spec.role == "refiner"
    assert isinstance(model.pipe, StableDiffusionXLImg2ImgPipeline)
