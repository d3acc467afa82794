"""rediss://: a real Redis with TLS on a port of its own, a certificate from a test CA."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from farm import broker
from farm.errors import ConfigError
from farm.jobs import JobSpec
from farm.scheduler.status import batch_status
from farm.scheduler.submit import submit
from farm.settings import Settings
from farm.store import open_store
from tests.conftest import run_farm


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    d = tmp_path / "tls"
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.crt", "-days", "1", "-subj", "/CN=farm-test-ca", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
             "server.csr", "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "ext.cnf", cwd=d)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", "server.crt", "--tls-key-file", "server.key",
         "--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no", "--save", "",
         "--appendonly", "no", "--requirepass", "tls-secret"],
        cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield f"rediss://:tls-secret@127.0.0.1:{port}/0", d / "ca.crt"
    finally:
        server.terminate()
        server.wait(10)


def test_a_job_travels_over_tls_with_a_password(tls_redis: tuple[str, Path],
                                                env: dict[str, str]) -> None:
    url, ca = tls_redis
    env = {**env, "FARM_BROKER_URL": url, "FARM_BROKER_CA_FILE": str(ca)}
    settings = Settings.load(env=env)
    spec = JobSpec.from_dict({"prompt": "over tls", "seed": 1, "steps": 2, "width": 64,
                              "height": 64}, settings)
    result = submit(settings, [spec])
    worker = run_farm(env, "worker", "--device", "cpu", "--max-jobs", "1", timeout=300)
    assert worker.returncode == 0, worker.stderr[-2000:]
    assert batch_status(open_store(settings), result.batch, settings).state == "succeeded"


def test_an_untrusted_certificate_is_a_clear_config_error(tls_redis: tuple[str, Path],
                                                          env: dict[str, str]) -> None:
    url, _ = tls_redis
    settings = Settings.load(env={**env, "FARM_BROKER_URL": url})
    with pytest.raises(ConfigError, match="not trusted.*set FARM_BROKER_CA_FILE"):
        broker.wait_for_broker(settings)
    assert "tls-secret" not in broker.redact(url)
