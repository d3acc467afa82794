"""Shared fixtures. Integration tests use the real Redis on 127.0.0.1:6379 (they fail, not skip,
when it is missing), the embedded Valkey, and S3 through boto3 against moto's HTTP server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from farm.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
# a database of its own, flushed by each test (TEST_REDIS_URL: another, for a second run at once)
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/11")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny models are built once per test run and shared by every test and subprocess."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def env(home: Path, models_dir: Path) -> dict[str, str]:
    """The environment for farm subprocesses: an empty FARM_HOME, the shared models."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("FARM_", "AWS_"))}
    out.update({"FARM_HOME": str(home), "FARM_MODELS_DIR": str(models_dir),
                "FARM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})
    return out


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return Settings.load(env=env)


@pytest.fixture
def redis_url() -> Iterator[str]:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as exc:  # fail, do not skip: CI must have it
        pytest.fail(f"integration tests need Redis on 127.0.0.1:6379: {exc}")
    client.flushdb()
    yield REDIS_URL
    client.flushdb()


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(env: dict[str, str], moto_endpoint: str, request: pytest.FixtureRequest
           ) -> dict[str, str]:
    """`env` pointed at a fresh bucket on moto's S3 server."""
    import re
    import uuid

    import boto3

    slug = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:30].strip("-")
    bucket = f"farm-{slug}-{uuid.uuid4().hex[:8]}"
    creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
             "AWS_DEFAULT_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    client.create_bucket(Bucket=bucket)
    os.environ.update(creds)  # boto3 in this process reads the standard variables
    return {**env, **creds, "FARM_STORE_URL": f"s3://{bucket}/renders",
            "FARM_S3_ENDPOINT_URL": moto_endpoint}


def farm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "farm.cli.main", *args]


def run_farm(env: dict[str, str], *args: str, timeout: float = 300, input: str | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(farm_cmd(*args), env=env, capture_output=True, text=True,
                          timeout=timeout, input=input, cwd=cwd or ROOT)
