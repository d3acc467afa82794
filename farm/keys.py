"""Every object key the farm uses in its store, built and parsed here and nowhere else.

    batches/<batch>/manifest.json            the request and every job's spec (create-once)
    batches/<batch>/submit.json              how far its submit got (farm/records.py)
    batches/<batch>/summary.json             its counts and failed jobs, once it ended
                                             (farm/summary.py)
    batches/<batch>/notified.json            its end's webhook: claimed once, then its
                                             outcome (farm/webhook.py)
    batches/<batch>/jobs/<job>.json          the job's record (farm/lifecycle.py)
    batches/<batch>/images/<job>-<k>.png     image k of the job
    batches/<batch>/images/<job>-<k>.json    its sidecar: full provenance
    batches/<batch>/gallery/index.html       its gallery page (scheduler/gallery.py), and
    batches/<batch>/gallery/shared.html      the one whose links are presigned
    batches/<batch>/gallery/thumbs/<job>-<k>.jpg
                                             image k's thumbnail
    batches/<batch>/intermediate/<job>/latents.safetensors
                                             base → refiner latents (worker/latents.py)
    batches/<batch>/intermediate/<job>/resume-<stage>-<image>-<step>.safetensors
                                             a handed-back stage's checkpoint (worker/latents.py)
    compile-cache/<model>/<key>.bin|.json    compile artefacts for the fleet (worker/compile.py)
    models/blobs/sha256/<digest>             one model file, named by the sha256 of its bytes
    models/manifests/<name>/<version>.json   one version of a model in the catalog
                                             (farm/catalog.py): its files' paths and digests
"""

from __future__ import annotations

BATCHES = "batches"
COMPILE_CACHE = "compile-cache"
MODELS = "models"
MODEL_MANIFESTS = f"{MODELS}/manifests"


def batch_prefix(batch: str) -> str:
    return f"{BATCHES}/{batch}"


def manifest_key(batch: str) -> str:
    return f"{batch_prefix(batch)}/manifest.json"


def submit_key(batch: str) -> str:
    return f"{batch_prefix(batch)}/submit.json"


def summary_key(batch: str) -> str:
    return f"{batch_prefix(batch)}/summary.json"


def notified_key(batch: str) -> str:
    return f"{batch_prefix(batch)}/notified.json"


def records_prefix(batch: str) -> str:
    return f"{batch_prefix(batch)}/jobs/"


def record_key(batch: str, job: str) -> str:
    return f"{records_prefix(batch)}{job}.json"


def image_key(batch: str, job: str, k: int) -> str:
    return f"{batch_prefix(batch)}/images/{job}-{k}.png"


def sidecar_key(batch: str, job: str, k: int) -> str:
    return f"{batch_prefix(batch)}/images/{job}-{k}.json"


def sidecar_of(image: str) -> str:
    """The sidecar key of an image key."""
    if not image.endswith(".png"):
        raise ValueError(f"not an image key: {image!r}")
    return image[: -len(".png")] + ".json"


def images_prefix(batch: str) -> str:
    return f"{batch_prefix(batch)}/images/"


def gallery_prefix(batch: str) -> str:
    return f"{batch_prefix(batch)}/gallery/"


def intermediates_prefix(batch: str) -> str:
    return f"{batch_prefix(batch)}/intermediate/"


def intermediate_prefix(batch: str, job: str) -> str:
    return f"{intermediates_prefix(batch)}{job}/"


def intermediate_job(key: str) -> tuple[str, str] | None:
    """(batch, job) of an intermediate object's key; None for any other key."""
    parts = key.split("/")
    if len(parts) == 5 and parts[0] == BATCHES and parts[2] == "intermediate":
        return parts[1], parts[3]
    return None


def handoff_key(batch: str, job: str) -> str:
    return f"{intermediate_prefix(batch, job)}latents.safetensors"


def checkpoint_key(batch: str, job: str, stage: str, image: int, step: int) -> str:
    return f"{intermediate_prefix(batch, job)}resume-{stage}-{image}-{step:04d}.safetensors"


def blob_key(digest: str) -> str:
    return f"{MODELS}/blobs/sha256/{digest}"


def model_manifest_key(name: str, version: int) -> str:
    return f"{MODEL_MANIFESTS}/{name}/{version}.json"


def model_manifest_ref(key: str) -> tuple[str, int] | None:
    """(name, version) of a model manifest's key; None for any other key."""
    parts = key.split("/")
    if len(parts) == 4 and "/".join(parts[:2]) == MODEL_MANIFESTS and \
            parts[3].endswith(".json") and parts[3][:-5].isdigit():
        return parts[2], int(parts[3][:-5])
    return None
