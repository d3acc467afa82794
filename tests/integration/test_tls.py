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


def _certificates(d: Path) -> None:
    """A test CA (ca.crt) and a server certificate for 127.0.0.1 it signed (server.crt/.key)."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.crt", "-days", "1", "-subj", "/CN=farm-test-ca", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
             "server.csr", "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "ext.cnf", cwd=d)


def _wait_for(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    d = tmp_path / "tls"
    d.mkdir()
    _certificates(d)
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
        _wait_for(port)
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


def test_the_generated_kubernetes_files_reach_a_tls_redis(tmp_path: Path,
                                                          env: dict[str, str]) -> None:
    """`farm deploy k8s --redis rediss://... --redis-ca ca.pem`, taken at its word: a Redis with
    TLS and the generated users; the worker and exporter pods' broker settings, and KEDA's
    trigger (address, enableTLS, the TriggerAuthentication's user, password and ca), each
    connect to it with the certificate from the generated Secret."""
    import secrets as tokens

    import redis
    import yaml

    from farm.deploy import access, k8s
    from farm.deploy import files as deploy
    from tests.integration.test_access import KEDA_LIST_LENGTH_SCRIPT

    d = tmp_path / "tls"
    d.mkdir()
    _certificates(d)
    passwords = {var: tokens.token_hex(8) for var in access.REDIS_PASSWORD_VARS.values()}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", "server.crt", "--tls-key-file", "server.key",
         "--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no", "--save", "",
         *access.redis_server_args(lambda var: passwords[var])[4:]],   # users, not the AOF
        cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(port)
        spec = deploy.make_spec(Settings.load(env={**env, "FARM_VRAM_CLASSES": "12,24"}),
                                classes=[24], model_names=["tiny-sdxl"],
                                redis_address=f"rediss://127.0.0.1:{port}",
                                redis_ca=d / "ca.crt")
        docs = [doc for name, text in k8s.render(spec).items() if name.endswith(".yaml")
                for doc in yaml.safe_load_all(text) if doc]
        secret = next(doc for doc in docs if doc["kind"] == "Secret")["stringData"]
        ca_file = tmp_path / "mounted-ca.pem"     # what the pod sees at FARM_BROKER_CA_FILE
        ca_file.write_text(secret[k8s.CA_KEY])

        pods = [doc for doc in docs if doc["kind"] == "Deployment"]
        assert {p["metadata"]["name"] for p in pods} >= {"farm-worker-24gb"}
        for pod in pods:
            container = pod["spec"]["template"]["spec"]["containers"][0]
            values = {e["name"]: e["value"] for e in container["env"] if "value" in e}
            url = values["FARM_BROKER_URL"]
            for var, password in passwords.items():
                url = url.replace(f"$({var})", password)
            assert values["FARM_BROKER_CA_FILE"] == k8s.CA_FILE
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert k8s.CA_FILE.rsplit("/", 1)[0] in mounts
            settings = Settings.load(env={**env, "FARM_BROKER_URL": url,
                                          "FARM_BROKER_CA_FILE": str(ca_file)})
            broker.wait_for_broker(settings, timeout=10)
            assert broker.redis_client(settings).llen("farm.tiny-sdxl.24gb.p5") == 0

        scaled = next(doc for doc in docs if doc["kind"] == "ScaledObject")
        auth = next(doc for doc in docs if doc["kind"] == "TriggerAuthentication")
        params = {r["parameter"]: passwords.get(r["key"], secret.get(r["key"]))
                  for r in auth["spec"]["secretTargetRef"]}
        for trigger in scaled["spec"]["triggers"]:
            meta = trigger["metadata"]
            assert meta["enableTLS"] == "true"
            host, _, port_text = meta["address"].rpartition(":")
            keda = redis.Redis(host=host, port=int(port_text), ssl=True,
                               ssl_ca_data=params["ca"], username=params["username"],
                               password=params["password"])
            assert keda.eval(KEDA_LIST_LENGTH_SCRIPT, 1, meta["listName"]) == 0
    finally:
        server.terminate()
        server.wait(10)
