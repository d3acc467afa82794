"""`farm results` and `farm gallery` against a filled store (benchmarks/_filled_batch.py: the
batch as workers would have left it, a stand-in for rendering): parallel downloads that skip
what is already whole, following a running batch, paged contact sheets, links that work
without credentials (S3 over HTTP, moto), and the gallery in a real headless Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from benchmarks._filled_batch import fill, png
from farm import keys
from farm.jobs import job_id
from farm.lifecycle import JobRecord, JobState
from farm.scheduler.results import download
from farm.settings import Settings
from farm.store import open_store, put_json
from tests.conftest import run_farm


def test_download_skips_whole_files_and_pages_sheets(settings: Settings, tmp_path: Path
                                                     ) -> None:
    store = open_store(settings)
    fill(store, settings, "b-pages", 115, n=2, size=64)   # 230 images: three sheets
    out = tmp_path / "out"
    got = download(store, "b-pages", out, settings)
    assert (len(got.images), got.fetched, got.skipped, got.missing) == (230, 230, 0, [])
    assert [p.name for p in got.contact_sheets] == [
        "contact-sheet-01.png", "contact-sheet-02.png", "contact-sheet-03.png"]
    assert len(list((out / "thumbs").glob("*.jpg"))) == 230
    # a truncated file is fetched again; the rest are skipped
    broken = got.images[7]
    broken.write_bytes(broken.read_bytes()[:20])
    again = download(store, "b-pages", out, settings)
    assert (again.fetched, again.skipped) == (1, 229)
    Image.open(broken).load()


def test_results_without_sheets_makes_no_thumbnails(env: dict[str, str], tmp_path: Path
                                                    ) -> None:
    settings = Settings.load(env=env)
    fill(open_store(settings), settings, "b-bare", 3, n=2, size=64)
    out = tmp_path / "bare"
    res = run_farm(env, "results", "b-bare", "-o", str(out), "--no-sheets")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.glob("*.png")) == [
        f"{job_id('b-bare', i)}-{k}.png" for i in range(3) for k in range(2)]
    assert len(list(out.glob("*.json"))) == 6
    assert not (out / "thumbs").exists() and "contact sheet" not in res.stdout
    # the same folder with sheets: nothing downloaded again, the thumbnails made for the sheet
    res = run_farm(env, "results", "b-bare", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert "(0 downloaded, 6 already here)" in res.stdout
    assert len(list((out / "thumbs").glob("*.jpg"))) == 6 and (out / "contact-sheet.png").exists()


def test_follow_downloads_each_image_as_its_job_succeeds(settings: Settings,
                                                         tmp_path: Path) -> None:
    store = open_store(settings)
    fill(store, settings, "b-follow", 4, n=1, size=64, succeeded=2)
    ended = threading.Event()
    seen: list[str] = []
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(download(
        store, "b-follow", tmp_path, settings, follow=True, poll_s=0.05,
        on_image=lambda item: seen.append(getattr(item, "key", "")),
        ended=ended.is_set)))
    thread.start()
    deadline = time.monotonic() + 10
    while len(seen) < 2:
        assert time.monotonic() < deadline, "the first two images never landed"
        time.sleep(0.02)
    for i in (2, 3):  # the last two jobs succeed while it follows
        job = job_id("b-follow", i)
        key = keys.image_key("b-follow", job, 0)
        store.put(keys.sidecar_of(key), json.dumps({"prompt": "late", "seed": i}).encode())
        store.put(key, png(i, 64, 64))
        record = JobRecord(job=job, batch="b-follow", state=JobState.SUCCEEDED, images=[key])
        put_json(store, keys.record_key("b-follow", job), record.encode())
    while len(seen) < 4:
        assert time.monotonic() < deadline, "the late images never landed"
        time.sleep(0.02)
    ended.set()
    thread.join(10)
    assert not thread.is_alive()
    assert sorted(seen) == [keys.image_key("b-follow", job_id("b-follow", i), 0)
                            for i in range(4)]


def test_urls_and_bad_durations(env: dict[str, str], s3_env: dict[str, str]) -> None:
    settings = Settings.load(env=s3_env)
    images = fill(open_store(settings), settings, "b-urls", 3, n=1, size=64)
    res = run_farm(s3_env, "results", "b-urls", "--urls", "--expires", "1h")
    assert res.returncode == 0, res.stderr
    urls = res.stdout.split()
    assert len(urls) == 3 and all("X-Amz-Expires=3600" in u for u in urls)
    with urllib.request.urlopen(urls[0], timeout=10) as reply:  # no credentials
        assert reply.read() == open_store(settings).get(images[0])
    for bad in ("0", "9d", "abc"):
        res = run_farm(s3_env, "results", "b-urls", "--urls", "--expires", bad)
        assert res.returncode == 2
        assert res.stderr.strip() == (
            "error: --expires must be a duration from 1s to 7d (a number with s, m, h or d, "
            f"e.g. 30m, 12h, 1d), got '{bad}'")
    fill(open_store(Settings.load(env=env)), Settings.load(env=env), "b-file", 1)
    for args in (("results", "b-file", "--urls"), ("gallery", "b-file", "--share")):
        res = run_farm(env, *args)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
        assert "need an S3 store" in res.stderr


def test_shared_gallery_works_without_credentials(s3_env: dict[str, str]) -> None:
    settings = Settings.load(env=s3_env)
    images = fill(open_store(settings), settings, "b-share", 3, n=2, size=64)
    res = run_farm(s3_env, "gallery", "b-share", "--share", "--expires", "2h")
    assert res.returncode == 0, res.stderr
    url = res.stdout.strip()
    assert "X-Amz-Signature=" in url and "/gallery/shared.html" in url
    with urllib.request.urlopen(url, timeout=10) as reply:  # no credentials
        assert reply.headers["Content-Type"].startswith("text/html")
        page = reply.read().decode()
    assert page.count('class="card"') == 6
    links = [html.unescape(h) for h in re.findall(r'href="([^"]+)"', page)]
    png_link = next(h for h in links if ".png?" in h)
    with urllib.request.urlopen(png_link, timeout=10) as reply:
        assert reply.read() == open_store(settings).get(images[0])
    thumb = re.search(r'<img src="([^"]+)"', page)
    assert thumb is not None
    with urllib.request.urlopen(html.unescape(thumb.group(1)), timeout=10) as reply:
        assert reply.read()[:2] == b"\xff\xd8"  # a JPEG


def test_gallery_in_the_store_links_to_the_batch_images(env: dict[str, str]) -> None:
    settings = Settings.load(env=env)
    store = open_store(settings)
    fill(store, settings, "b-stored", 3, n=1, size=64)
    res = run_farm(env, "gallery", "b-stored", "--store")
    assert res.returncode == 0, res.stderr
    page_key = keys.gallery_prefix("b-stored") + "index.html"
    assert res.stdout.strip() == f"gallery: {store.url}/{page_key}"
    page = store.get(page_key).decode()
    assert page.count('class="card"') == 3
    folder = Path(settings.effective_store_url.removeprefix("file://")) / page_key
    links = re.findall(r'(?:href|src)="([^"]+)"', page)
    assert {link.rsplit(".", 1)[-1] for link in links} == {"png", "json", "jpg"}
    for link in links:  # every relative link names an object in the store
        assert (folder.parent / link).resolve().is_file(), link


def _chromium() -> str:
    found = shutil.which("chromium")
    if found is None:  # fail, do not skip: .ci/run installs it
        pytest.fail("the gallery test needs Debian's chromium (apt-get install -y chromium)")
    return found


def _headless(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                           "--hide-scrollbars", *args], capture_output=True, text=True,
                          timeout=120)


def test_gallery_in_a_headless_browser(env: dict[str, str], tmp_path: Path) -> None:
    settings = Settings.load(env=env)
    fill(open_store(settings), settings, "b-gallery", 5, n=2, size=64)  # 2 of 5 prompts: fox
    out = tmp_path / "gallery"
    res = run_farm(env, "gallery", "b-gallery", "-o", str(out))
    assert res.returncode == 0, res.stderr
    page = (out / "index.html").as_uri()

    dom = _headless("--dump-dom", page + "?q=fox").stdout
    cards = re.findall(r'<figure class="card"[^>]*>', dom)
    assert len(cards) == 10
    shown = [c for c in cards if "hidden" not in c]
    assert len(shown) == 2 and all("fox" in c for c in shown)
    assert '<span id="shown">2</span>' in dom

    shot = tmp_path / "shot.png"
    _headless(f"--screenshot={shot}", "--window-size=1200,900", page)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 900)
    # each thumbnail is a flat colour (benchmarks/_filled_batch.py); a decoded one fills its
    # 256-pixel box with that colour, far from the page's dark background
    # (within a JPEG's error)
    colours = {png_colour(seed) for seed in range(1000, 1010)}
    pixels = {image.getpixel((x, y)) for y in range(60, 900, 8) for x in range(0, 1200, 8)}
    found = {c for c in colours
             if any(max(abs(a - b) for a, b in zip(c, p, strict=True)) <= 12 for p in pixels)}
    assert len(found) >= 6, f"thumbnails did not render: found {len(found)} of their colours"


def png_colour(seed: int) -> tuple[int, int, int]:
    image = Image.open(__import__("io").BytesIO(png(seed, 64, 64))).convert("RGB")
    return image.getpixel((1, 1))  # type: ignore[return-value]
