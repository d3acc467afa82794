"""Least privilege: what each part of the farm may do in Redis and in the object store.

One table, `ROLES`, is the single source of every grant: the deployment files (compose, the
in-cluster Redis of the Kubernetes files), `farm up`'s embedded broker, the S3 policies in
`policies/`, and the access text in deploy/README.md are all generated from it
(`python -m farm.deploy.access` prints that text; a test checks the README holds it).
`tests/integration/test_access.py` starts a real Valkey with these users and has each role do
everything it does, and be refused what it must not.

    worker    takes, renders, acks, heartbeats, listens for cancels, sweeps: the queues, the
              farm's keys, Celery's late-ack bookkeeping (`unacked*`), its bindings and remote
              control (`*.celery.pidbox`, `/<db>.celery.pidbox`), Lua (kombu's restore sweep)
    cli       submit, status/watch, cancel, resubmit, workers, batches: pushes to the queues
              and reads them, writes the farm's batch keys and counters, publishes cancels; it
              cannot take a message off a queue or touch Celery's unacked bookkeeping
    scaler    KEDA's Redis scaler: EVAL of its list-length script (TYPE, then LLEN) on the
              queue lists, nothing else (no writes, no other keys)
    metrics   `farm metrics serve`: read-only, the commands and keys the exporter declares
    local     `farm up`'s embedded broker on a unix socket only its owner can open: every
              command except the dangerous ones, plus INFO and CLIENT LIST (the benchmarks
              read the broker's own counters)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from farm import fleet, queues, recovery
from farm.keys import COMPILE_CACHE as CACHE_PREFIX
from farm.scheduler import exporter

QUEUE_KEYS = f"{queues.QUEUE_PREFIX}.*"          # farm.<model>.<class>gb.p<priority>
FARM_KEYS = f"{fleet.KEY_PREFIX.split(':')[0]}:*"  # farm:worker:<name>, and any farm:* key
KOMBU_BINDINGS = "_kombu.binding*"   # _kombu.binding.*, _kombu.binding_permanent.*, _deadlines
KOMBU_UNACKED = ("unacked", "unacked_index", "unacked_mutex")
# remote control: each worker's <name>@<host>.celery.pidbox list, and <uuid>.reply.celery.pidbox
PIDBOX_LISTS = "*.celery.pidbox"
# Celery's fanout exchanges on Redis are pub/sub channels named /<db>.<exchange>. kombu listens
# with PSUBSCRIBE, whose argument an ACL matches literally, so this names the database. Only
# remote control's: the workers send no events and run without gossip (worker/runtime.py).
CHANNELS = ("/{db}.celery.pidbox",)
# `farm cancel` broadcasts here; every worker listens (farm/recovery.py)
CANCEL_CHANNEL = recovery.CANCEL_CHANNEL

# KEDA's Redis scaler (pkg/scalers/redis_scaler.go, v2.20) counts a list with one EVAL whose
# script calls TYPE and then LLEN (or ZCARD/SCARD/HLEN for other types; the farm's queues are
# lists). Valkey checks every call inside a script against the user's own rules, so granting
# EVAL grants no command the user lacks; but EVAL declares its keys read-write, so the key
# pattern cannot be the read-only `%R~`.
SCALER_COMMANDS = ("eval", "type", "llen")

# Commands the CLI sends (`farm submit/status/cancel/resubmit/workers/batches`, and kombu
# publishing a message: SADD of the binding, LPUSH): no BRPOP/RPOP/LMOVE, so it cannot consume.
# The batch's state counters (farm/tally.py) are a hash the CLI starts at submit and notes
# cancels in, with Lua scripts; a script runs with the CLI's own rights, so EVAL adds nothing.
CLI_COMMANDS = ("lpush", "llen", "sadd", "srem", "smembers", "scard", "sismember", "set", "get",
                "mget", "exists", "expire", "del", "scan", "multi", "exec", "discard", "watch",
                "unwatch", "publish", "hset", "hmget", "hgetall", "eval", "evalsha",
                "script|load")

_DATA = ("+@read", "+@write", "+@transaction")
_SAFE = ("-@dangerous", "-@admin")
_BASE = ("resetkeys", "resetchannels", "-@all", "+@connection")


@dataclass(frozen=True)
class Role:
    """One part of the farm and what it may do: Redis (its user, keys, channels, commands)
    and the object store (IAM statements; none when it never touches the store)."""

    name: str
    what: str
    user: str
    password_var: str
    keys: tuple[str, ...] = ()           # read-write key patterns
    read_keys: tuple[str, ...] = ()      # read-only key patterns (%R~)
    channels: tuple[str, ...] = ()       # may name {db}
    commands: tuple[str, ...] = ()       # +command / +@category / -... in order
    s3: Callable[[str, str], list[dict[str, Any]]] | None = field(default=None, compare=False)

    def redis_rules(self, db: int = 0) -> list[str]:
        """The ACL rules after `user NAME on >PASSWORD`, for database `db`."""
        return [*_BASE, *(f"~{k}" for k in self.keys), *(f"%R~{k}" for k in self.read_keys),
                *(f"&{c.format(db=db)}" for c in self.channels), *self.commands]


def _under(prefix: str, name: str) -> str:
    return "/".join(p for p in (prefix.strip("/"), name) if p) + "/*"


def _arn(bucket: str, prefix: str, rest: str) -> str:
    path = "/".join(p for p in (prefix.strip("/"), rest) if p)
    return f"arn:aws:s3:::{bucket}/{path}"


def _listing(bucket: str, prefixes: Sequence[str]) -> dict[str, Any]:
    # without ListBucket a HEAD of a missing key answers 403, not 404, and `store.exists`
    # would read "access denied" where it means "not there yet"
    return {"Sid": "ListBatches", "Effect": "Allow", "Action": ["s3:ListBucket"],
            "Resource": [f"arn:aws:s3:::{bucket}"],
            "Condition": {"StringLike": {"s3:prefix": list(prefixes)}}}


def _worker_s3(bucket: str, prefix: str) -> list[dict[str, Any]]:
    return [
        # records (compare-and-set), images and sidecars, latents it deletes once refined
        {"Sid": "BatchObjects", "Effect": "Allow",
         "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
         "Resource": [_arn(bucket, prefix, "batches/*")]},
        # the fleet compile cache (worker/compile.py): read by every worker, written by the
        # first of each kind
        {"Sid": "CompileCache", "Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"],
         "Resource": [_arn(bucket, prefix, f"{CACHE_PREFIX}/*")]},
        _listing(bucket, [_under(prefix, "batches"), _under(prefix, CACHE_PREFIX)]),
    ]


def _cli_s3(bucket: str, prefix: str) -> list[dict[str, Any]]:
    return [
        # the submit record and the manifest (farm/records.py)
        {"Sid": "SubmitBatches", "Effect": "Allow", "Action": ["s3:PutObject"],
         "Resource": [_arn(bucket, prefix, "batches/*/manifest.json"),
                      _arn(bucket, prefix, "batches/*/submit.json")]},
        {"Sid": "ReadBatches", "Effect": "Allow", "Action": ["s3:GetObject"],
         "Resource": [_arn(bucket, prefix, "batches/*")]},
        # `farm cancel` marks jobs that are not running canceled at once (a compare-and-set);
        # when that ends the batch, it writes the batch's summary and claims its notification
        {"Sid": "CancelRecords", "Effect": "Allow", "Action": ["s3:PutObject"],
         "Resource": [_arn(bucket, prefix, "batches/*/jobs/*"),
                      _arn(bucket, prefix, "batches/*/summary.json"),
                      _arn(bucket, prefix, "batches/*/notified.json")]},
        # `farm gallery --store|--share` writes the page and thumbnails beside the batch
        {"Sid": "Galleries", "Effect": "Allow", "Action": ["s3:PutObject"],
         "Resource": [_arn(bucket, prefix, "batches/*/gallery/*")]},
        # `farm clean` removes kept base -> refiner latents
        {"Sid": "CleanIntermediates", "Effect": "Allow", "Action": ["s3:DeleteObject"],
         "Resource": [_arn(bucket, prefix, "batches/*/intermediate/*")]},
        _listing(bucket, [_under(prefix, "batches")]),
    ]


ROLES: dict[str, Role] = {r.name: r for r in (
    Role("worker", "farm worker: take, render, ack, heartbeat, listen for cancels, sweep",
         "farm-worker", "REDIS_WORKER_PASSWORD",
         keys=(QUEUE_KEYS, FARM_KEYS, KOMBU_BINDINGS, *KOMBU_UNACKED, PIDBOX_LISTS),
         channels=(*CHANNELS, CANCEL_CHANNEL),
         # +time: kombu's restore sweep is a Lua script that reads the server clock
         commands=(*_DATA, "+@pubsub", "+@scripting", "+time", *_SAFE),
         s3=_worker_s3),
    Role("cli", "farm submit, status, cancel, resubmit, workers, batches, results",
         "farm-cli", "REDIS_CLI_PASSWORD",
         keys=(QUEUE_KEYS, FARM_KEYS, KOMBU_BINDINGS), channels=(CANCEL_CHANNEL,),
         commands=(*(f"+{c}" for c in CLI_COMMANDS), *_SAFE), s3=_cli_s3),
    Role("scaler", "KEDA's Redis scaler: the length of each queue list",
         "farm-scaler", "REDIS_SCALER_PASSWORD",
         keys=(QUEUE_KEYS,), commands=(*(f"+{c}" for c in SCALER_COMMANDS), *_SAFE)),
    Role("metrics", "farm metrics serve: queue depths, live workers, active batches",
         "farm-metrics", "REDIS_METRICS_PASSWORD",
         read_keys=exporter.EXPORTER_KEYS,
         commands=(*(f"+{c}" for c in exporter.EXPORTER_COMMANDS), *_SAFE)),
)}

# farm up's embedded broker: one user, `default`, on a unix socket with mode 0700
LOCAL = Role("local", "farm up's embedded broker (every farm process of one OS user)",
             "default", "", keys=("*",), channels=("*",),
             commands=("+@all", *_SAFE, "+info", "+client|list"))

REDIS_USERS = {name: r.user for name, r in ROLES.items()}
# the variables that hold each role's Redis password (compose's .env, a Kubernetes Secret)
REDIS_PASSWORD_VARS = {name: r.password_var for name, r in ROLES.items()}


def role(name: str) -> Role:
    try:
        return ROLES[name]
    except KeyError:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {name!r}") from None


def redis_rules(name: str, db: int = 0) -> list[str]:
    """The ACL rules of a role (after `user NAME on >PASSWORD`) on database `db`."""
    return role(name).redis_rules(db)


def redis_user_line(name: str, password: str, db: int = 0) -> str:
    """One line of an ACL file (`aclfile`) or of `ACL SETUSER`'s arguments."""
    r = role(name)
    return " ".join(["user", r.user, "on", f">{password}", *r.redis_rules(db)])


def local_user_line() -> str:
    """The embedded broker's `default` user, as a valkey.conf line (no password: the socket's
    file mode is the boundary)."""
    return " ".join(["user", "default", "on", "nopass", *LOCAL.redis_rules()])


def redis_server_args(password: Callable[[str], str],
                      roles: Sequence[str] = tuple(ROLES)) -> list[str]:
    """valkey-server/redis-server arguments: append-only persistence and one ACL user per role,
    the default user off. `password(var)` writes the reference to a password variable in the
    file's own syntax (`${VAR}` for compose, `$(VAR)` for Kubernetes)."""
    args = [
        # queued jobs survive a restart: append-only file, fsync once a second
        "--appendonly", "yes", "--appendfsync", "everysec",
        "--user", "default", "off",
    ]
    for name in roles:
        r = role(name)
        args += ["--user", r.user, "on", f">{password(r.password_var)}", *r.redis_rules()]
    return args


def broker_url(name: str, host: str, password_ref: str, db: int = 0, tls: bool = False) -> str:
    scheme = "rediss" if tls else "redis"
    return f"{scheme}://{role(name).user}:{password_ref}@{host}/{db}"


# -- S3 ----------------------------------------------------------------------------------------


def s3_roles() -> list[str]:
    """The roles that use the object store, each with its own policy."""
    return [name for name, r in ROLES.items() if r.s3 is not None]


def s3_policy(name: str, bucket: str, prefix: str = "") -> dict[str, Any]:
    """An IAM policy document for a role on the farm's store s3://bucket/prefix."""
    r = role(name)
    if r.s3 is None:
        raise ValueError(f"S3 roles are {' and '.join(s3_roles())}, got {name!r}")
    return {"Version": "2012-10-17", "Statement": r.s3(bucket, prefix)}


# -- the text deploy/README.md shows -------------------------------------------------------------

README_BEGIN = "<!-- access: generated by `python -m farm.deploy.access`; do not edit -->"
README_END = "<!-- access: end -->"
EXAMPLE_STORE = ("my-renders", "farm")


def readme_text() -> str:
    """The Redis ACL lines and the S3 policies, as deploy/README.md shows them."""
    bucket, prefix = EXAMPLE_STORE
    lines = [README_BEGIN, "", "Redis users (an `aclfile`, or each line without `user` as "
             "`ACL SETUSER`'s arguments):", "", "```", "user default off"]
    lines += [redis_user_line(name, "PASSWORD") for name in ROLES]
    lines += ["```", "", "| user | role | password variable |", "|---|---|---|"]
    lines += [f"| `{r.user}` | {r.what} | `{r.password_var}` |" for r in ROLES.values()]
    lines += ["", "`farm up`'s embedded broker (a unix socket of mode 0700, no TCP):", "",
              "```", local_user_line(), "```"]
    for name in s3_roles():
        lines += ["", f"S3 policy of the {name} role for the store `s3://{bucket}/{prefix}` "
                  f"(`policies/{name}.json`):", "", "```json",
                  json.dumps(s3_policy(name, bucket, prefix), indent=2), "```"]
    return "\n".join([*lines, "", README_END])


if __name__ == "__main__":
    print(readme_text())
