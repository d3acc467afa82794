"""Least privilege: what each part of the farm may do in Redis and in the object store.

Redis (ACL users, one per role; the `default` user is switched off):

    worker   its queues and the farm's own keys, plus what Celery's Redis transport keeps
             beside them: `_kombu.binding.*` (queue bindings), `unacked`, `unacked_index`,
             `unacked_mutex` (late-ack bookkeeping and the restore sweep), the remote-control
             reply lists and the pidbox and event channels (Flower's inspect)
    cli      push to the queues and read the farm's keys: `farm submit`, `farm workers`,
             `farm status` (its waiting hints). No unacked, no pub/sub.
    scaler   KEDA: read the queue lists, nothing else

S3 (IAM policies; MinIO takes the same JSON):

    worker   Get/Put/Delete under <prefix>/batches/*, Get/Put under <prefix>/compile-cache/*,
             and ListBucket on those prefixes: without
             ListBucket a HEAD of a missing key answers 403, not 404, and the worker's
             `store.exists` would read "access denied" where it means "not there yet"
    cli      Put the manifest, Get and List under batches/, Delete the latents `farm clean`
             removes (batches/*/intermediate/*)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from farm import fleet, queues, recovery
from farm.keys import COMPILE_CACHE as CACHE_PREFIX

ROLES = ("worker", "cli", "scaler")
REDIS_USERS = {"worker": "farm-worker", "cli": "farm-cli", "scaler": "farm-scaler"}
# the variables that hold each role's Redis password (compose's .env, a Kubernetes Secret)
REDIS_PASSWORD_VARS = {"worker": "REDIS_WORKER_PASSWORD", "cli": "REDIS_CLI_PASSWORD",
                       "scaler": "REDIS_SCALER_PASSWORD"}

QUEUE_KEYS = f"{queues.QUEUE_PREFIX}.*"          # farm.<model>.<class>gb.p<priority>
FARM_KEYS = f"{fleet.KEY_PREFIX.split(':')[0]}:*"  # farm:worker:<name>, and any farm:* key
KOMBU_BINDINGS = "_kombu.binding*"   # _kombu.binding.*, _kombu.binding_permanent.*, _deadlines
KOMBU_UNACKED = ("unacked", "unacked_index", "unacked_mutex")
# remote control: each worker's <name>@<host>.celery.pidbox list, and <uuid>.reply.celery.pidbox
PIDBOX_LISTS = "*.celery.pidbox"
# Celery's fanout exchanges on Redis are pub/sub channels named /<db>.<exchange>. kombu listens
# with PSUBSCRIBE, whose argument an ACL matches literally, so these name the database.
CHANNELS = ("/{db}.celery.pidbox", "/{db}.celeryev*")
# `farm cancel` broadcasts here; every worker listens (farm/recovery.py)
CANCEL_CHANNEL = recovery.CANCEL_CHANNEL

_DATA = ["+@read", "+@write", "+@transaction"]
_SAFE = ["-@dangerous", "-@admin"]


def redis_rules(role: str, db: int = 0) -> list[str]:
    """The ACL rules of a role (after `user NAME on >PASSWORD`) on database `db`."""
    base = ["resetkeys", "resetchannels", "-@all", "+@connection"]
    if role == "worker":
        keys = [QUEUE_KEYS, FARM_KEYS, KOMBU_BINDINGS, *KOMBU_UNACKED, PIDBOX_LISTS]
        return [*base, *(f"~{k}" for k in keys), *(f"&{c.format(db=db)}" for c in CHANNELS),
                f"&{CANCEL_CHANNEL}", *_DATA, "+@pubsub", "+@scripting",
                "+time", *_SAFE]  # kombu's Lua scripts read the server clock
    if role == "cli":
        keys = [QUEUE_KEYS, FARM_KEYS, KOMBU_BINDINGS]
        return [*base, *(f"~{k}" for k in keys), f"&{CANCEL_CHANNEL}", *_DATA, "+publish",
                *_SAFE]
    if role == "scaler":
        return [*base, f"%R~{QUEUE_KEYS}", "+llen", "+type", "+exists"]
    raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")


def redis_user_line(role: str, password: str) -> str:
    """One line of an ACL file (`aclfile`) or of `ACL SETUSER`'s arguments."""
    return " ".join(["user", REDIS_USERS[role], "on", f">{password}", *redis_rules(role)])


def redis_server_args(password: Callable[[str], str],
                      roles: Sequence[str] = ROLES) -> list[str]:
    """valkey-server/redis-server arguments: append-only persistence and one ACL user per role,
    the default user off. `password(var)` writes the reference to a password variable in the
    file's own syntax (`${VAR}` for compose, `$(VAR)` for Kubernetes)."""
    args = [
        # queued jobs survive a restart: append-only file, fsync once a second
        "--appendonly", "yes", "--appendfsync", "everysec",
        "--user", "default", "off",
    ]
    for role in roles:
        args += ["--user", REDIS_USERS[role], "on", f">{password(REDIS_PASSWORD_VARS[role])}",
                 *redis_rules(role)]
    return args


def broker_url(role: str, host: str, password_ref: str, db: int = 0) -> str:
    return f"redis://{REDIS_USERS[role]}:{password_ref}@{host}/{db}"


# -- S3 ----------------------------------------------------------------------------------------


def _arn(bucket: str, prefix: str, rest: str) -> str:
    path = "/".join(p for p in (prefix.strip("/"), rest) if p)
    return f"arn:aws:s3:::{bucket}/{path}"


def s3_policy(role: str, bucket: str, prefix: str = "") -> dict[str, Any]:
    """An IAM policy document for a role on the farm's store s3://bucket/prefix."""
    def under(name: str) -> str:
        return "/".join(p for p in (prefix.strip("/"), name) if p) + "/*"

    listed = [under("batches")] + ([under(CACHE_PREFIX)] if role == "worker" else [])
    listing = {"Sid": "ListBatches", "Effect": "Allow", "Action": ["s3:ListBucket"],
               "Resource": [f"arn:aws:s3:::{bucket}"],
               "Condition": {"StringLike": {"s3:prefix": listed}}}
    if role == "worker":
        statements = [
            {"Sid": "BatchObjects", "Effect": "Allow",
             "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
             "Resource": [_arn(bucket, prefix, "batches/*")]},
            # the fleet compile cache (worker/compile.py): read by every worker, written by
            # the first of each kind
            {"Sid": "CompileCache", "Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"],
             "Resource": [_arn(bucket, prefix, f"{CACHE_PREFIX}/*")]},
            listing,
        ]
    elif role == "cli":
        statements = [
            {"Sid": "SubmitManifest", "Effect": "Allow", "Action": ["s3:PutObject"],
             "Resource": [_arn(bucket, prefix, "batches/*/manifest.json")]},
            {"Sid": "ReadBatches", "Effect": "Allow", "Action": ["s3:GetObject"],
             "Resource": [_arn(bucket, prefix, "batches/*")]},
            # `farm cancel` marks jobs that are not running canceled at once
            {"Sid": "CancelRecords", "Effect": "Allow", "Action": ["s3:PutObject"],
             "Resource": [_arn(bucket, prefix, "batches/*/jobs/*")]},
            {"Sid": "CleanIntermediates", "Effect": "Allow", "Action": ["s3:DeleteObject"],
             "Resource": [_arn(bucket, prefix, "batches/*/intermediate/*")]},
            listing,
        ]
    else:
        raise ValueError(f"S3 roles are worker and cli, got {role!r}")
    return {"Version": "2012-10-17", "Statement": statements}
