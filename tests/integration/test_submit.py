"""Submitting against the real Redis on 127.0.0.1:6379 and against the embedded server."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import pytest
import redis

from farm import broker, queues
from farm.errors import BrokerUnavailable, UsageError
from farm.jobs import JobSpec, Message
from farm.keys import manifest_key
from farm.records import read_manifest
from farm.scheduler.status import batch_status
from farm.scheduler.submit import submit
from farm.settings import Settings
from farm.store import open_store


def _specs(settings: Settings, *priorities: int) -> list[JobSpec]:
    return [JobSpec.from_dict({"prompt": f"p{i}", "priority": p, "seed": i}, settings)
            for i, p in enumerate(priorities)]


def _message(raw: bytes) -> dict:
    """The job a Celery message on a Redis list carries (args[0] of its base64 JSON body)."""
    return json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0]


def _waiting(client: redis.Redis, vram_class: int = 4) -> list[dict]:
    """Messages waiting for a tiny-sdxl worker of `vram_class`, in the order it takes them."""
    out = []
    for queue in queues.worker_queues(["tiny-sdxl"], vram_class, (4, 8, 24)):
        for raw in reversed(client.lrange(queue, 0, -1)):  # kombu pushes left, pops right
            out.append(_message(raw))
    return out


def _flaky_send_task(monkeypatch: pytest.MonkeyPatch, breaks: Callable[[int], bool]
                     ) -> list[int]:
    """Make Celery's send_task raise a ConnectionError on the n-th call (counting from 1) when
    `breaks(n)`; returns the list its calls are counted in."""
    from celery import Celery

    real = Celery.send_task
    calls: list[int] = []

    def flaky(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if breaks(len(calls)):
            raise ConnectionError("broker went away")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Celery, "send_task", flaky)
    return calls


@pytest.fixture(params=["redis", "embedded"])
def target(request: pytest.FixtureRequest, env: dict[str, str]):  # type: ignore[no-untyped-def]
    if request.param == "redis":
        env = {**env, "FARM_BROKER_URL": request.getfixturevalue("redis_url")}
    settings = Settings.load(env=env)
    yield settings
    broker.stop_broker(settings)


def test_submit_writes_the_manifest_and_queues_by_priority(target: Settings) -> None:
    settings = target
    result = submit(settings, _specs(settings, 5, 9, 0, 5))
    store = open_store(settings)
    manifest = read_manifest(store, result.batch, settings)
    assert [j.id for j in manifest.jobs] == [j.id for j in result.jobs]
    assert batch_status(store, result.batch, settings).counts == {"queued": 4}

    client = broker.redis_client(settings)
    waiting = _waiting(client)
    # most urgent first, then submission order within a priority
    jobs = {j.id: j for j in manifest.jobs}
    assert [jobs[m["id"]].spec.priority for m in waiting] == [9, 5, 5, 0]
    assert [jobs[m["id"]].index for m in waiting] == [1, 0, 3, 2]
    # what travels names a job of the manifest, nothing more, and resolves to that job
    message = Message.decode(waiting[0])
    assert manifest.job(message.job).for_message(message) == result.jobs[1]


def test_embedded_broker_starts_on_demand_and_keeps_jobs_across_restart(env: dict[str, str]
                                                                        ) -> None:
    settings = Settings.load(env=env)
    assert not broker.embedded_running(settings)
    result = submit(settings, _specs(settings, 5, 5))
    assert broker.embedded_running(settings)
    assert settings.broker_socket.exists()
    broker.stop_broker(settings)
    assert not broker.embedded_running(settings)
    broker.ensure_broker(settings)  # the append-only file brings the queue back
    try:
        client = broker.redis_client(settings)
        ids = [m["id"] for m in _waiting(client)]
        assert sorted(ids) == sorted(j.id for j in result.jobs)
    finally:
        broker.stop_broker(settings)
    assert not settings.broker_socket.exists()


def test_jobs_are_routed_to_the_queue_of_their_model_class_and_priority(redis_url: str,
                                                                       env: dict[str, str]
                                                                       ) -> None:
    settings = Settings.load(env={**env, "FARM_BROKER_URL": redis_url})
    specs = [JobSpec.from_dict({"prompt": "a", "min_vram": mv, "priority": p}, settings)
             for mv, p in ((0, 5), (8, 9), (20, 0), (8, 5))]
    result = submit(settings, specs)
    client = broker.redis_client(settings)
    assert [j.vram_class for j in result.jobs] == [4, 8, 24, 8]
    for job in result.jobs:
        queue = queues.queue_name("tiny-sdxl", job.vram_class, job.spec.priority)
        assert job.id in [_message(raw)["id"] for raw in client.lrange(queue, 0, -1)]
    # what an 8 GB worker would take, in order: its own class by priority, then the 4 GB one;
    # never the 24 GB job
    index = {j.id: j.index for j in result.jobs}
    assert [index[m["id"]] for m in _waiting(client, 8)] == [1, 3, 0]
    assert [index[m["id"]] for m in _waiting(client, 24)] == [2, 1, 3, 0]


def test_unreachable_broker_fails_clearly_and_writes_nothing(env: dict[str, str]) -> None:
    env = {**env, "FARM_BROKER_URL": "redis://127.0.0.1:1/0", "FARM_BROKER_CONNECT_TIMEOUT": "1"}
    settings = Settings.load(env=env)
    with pytest.raises(BrokerUnavailable, match="cannot reach the broker at redis://127.0.0.1:1"):
        submit(settings, _specs(settings, 5))
    assert open_store(settings).list_keys("batches/") == []


def test_password_in_broker_url_is_not_printed(env: dict[str, str]) -> None:
    env = {**env, "FARM_BROKER_URL": "redis://user:s3cret@127.0.0.1:1/0",
           "FARM_BROKER_CONNECT_TIMEOUT": "0.5"}
    with pytest.raises(BrokerUnavailable) as err:
        broker.wait_for_broker(Settings.load(env=env))
    assert "s3cret" not in str(err.value) and "user:***@" in str(err.value)


def test_acl_user_with_password_works(redis_url: str, env: dict[str, str]) -> None:
    admin = redis.Redis.from_url(redis_url)
    admin.execute_command("ACL", "SETUSER", "farmtest", "on", ">pw-123", "~*", "&*", "+@all")
    try:
        url = "redis://farmtest:pw-123@127.0.0.1:6379/11"
        settings = Settings.load(env={**env, "FARM_BROKER_URL": url})
        result = submit(settings, _specs(settings, 5))
        assert open_store(settings).exists(manifest_key(result.batch))
        bad = Settings.load(env={**env, "FARM_BROKER_URL": url.replace("pw-123", "nope")})
        from farm.errors import ConfigError

        with pytest.raises(ConfigError, match="refused the credentials"):
            broker.wait_for_broker(bad)
    finally:
        admin.execute_command("ACL", "DELUSER", "farmtest")


def test_each_submit_is_a_new_batch(env: dict[str, str]) -> None:
    settings = Settings.load(env=env)
    try:
        a = submit(settings, _specs(settings, 5))
        b = submit(settings, _specs(settings, 5))
        assert a.batch != b.batch
    finally:
        broker.stop_broker(settings)


def test_enqueue_breaking_part_way_marks_the_batch_aborted(
        redis_url: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings.load(env={**env, "FARM_BROKER_URL": redis_url})
    # the first message goes, then the broker stays away
    calls = _flaky_send_task(monkeypatch, lambda n: n >= 2)
    with pytest.raises(BrokerUnavailable, match="nothing was submitted"):
        submit(settings, _specs(settings, 5, 5, 5))
    assert len(calls) == 4  # three attempts: the first breaks at its second job
    store = open_store(settings)
    (batch,) = store.list_dirs("batches")
    status = batch_status(store, batch, settings)
    assert status.state == "aborted"
    assert status.submit is not None and "broker went away" in (status.submit.reason or "")


def test_a_send_that_breaks_once_is_sent_again_whole_and_only_once(
        redis_url: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings.load(env={**env, "FARM_BROKER_URL": redis_url})
    calls = _flaky_send_task(monkeypatch, lambda n: n == 3)   # the first attempt's third job
    done = submit(settings, _specs(settings, 5, 5, 5))
    assert len(calls) == 6  # the whole lot again
    client = broker.redis_client(settings)
    # the broken attempt's messages were held in the publish batch and never flushed
    assert len(_waiting(client)) == 3
    store = open_store(settings)
    assert batch_status(store, done.batch, settings).state != "aborted"


def test_a_batch_goes_to_each_queue_in_one_lpush_in_submit_order(
        redis_url: str, env: dict[str, str]) -> None:
    settings = Settings.load(env={**env, "FARM_BROKER_URL": redis_url})
    client = broker.redis_client(settings)

    def lpushes() -> int:
        return int(client.info("commandstats").get("cmdstat_lpush", {}).get("calls", 0))

    before = lpushes()
    done = submit(settings, _specs(settings, *[5, 9] * 6))   # two queues, interleaved
    assert lpushes() - before == 2
    ids = [j.id for j in done.jobs]
    assert [m["id"] for m in _waiting(client)] == ids[1::2] + ids[::2]


def test_an_idempotency_key_makes_a_retried_submit_continue_the_same_batch(
        redis_url: str, env: dict[str, str]) -> None:
    settings = Settings.load(env={**env, "FARM_BROKER_URL": redis_url})
    specs = _specs(settings, 5, 5, 5)
    first = submit(settings, specs, idempotency_key="nightly run 2026-12-03")
    again = submit(settings, specs, idempotency_key="nightly run 2026-12-03")
    assert (again.batch, again.continued, again.sent) == (first.batch, True, 0)
    assert [j.spec for j in again.jobs] == [j.spec for j in first.jobs]
    client = broker.redis_client(settings)
    assert len(_waiting(client)) == 3  # one message per job, not two
    with pytest.raises(UsageError, match="different request"):
        submit(settings, _specs(settings, 9), idempotency_key="nightly run 2026-12-03")
    assert submit(settings, specs).batch != first.batch  # no key: a new batch each time
