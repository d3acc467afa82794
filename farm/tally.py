"""Each batch's state counters, kept in Redis as its jobs move, so that `farm status` and
`--watch` cost the same for ten jobs or ten thousand. The job records in the store stay the
source of truth; the tally is a cache of them that repairs itself.

One hash per batch, `farm:tally:<batch>`:

    #total                  the batch's jobs
    #queued, #running, ...  how many jobs are in each state (farm/lifecycle.py JobState)
    <job>                   "<seq>:<state>": the newest record write the tally has counted

`note` applies one record write atomically (a Lua script): only when its `seq` (the record's
write count) is above the one counted for that job, moving one job from its old state's count
to its new one. So a note is idempotent and order-free: applying a record twice, or an older
write after a newer one, changes nothing. It is applied by the process whose compare-and-set
won (farm/lifecycle.py `commit(..., then=...)`), and again by whoever later reads a final
record (a second delivery of its message): a process that died between its store write and
its note is repaired by the next one that sees the record. When the batch ends, `reset` writes
the counts of a full recount (farm/summary.py), which repairs anything else.

Reconciling (farm/recovery.py) takes the jobs the tally counts final out of the batch's open
set when it looks for lost messages, so a job's end costs its worker one Redis command (the
note, which also acks the job's message: worker/finisher.py), and a note that never ran leaves
the job open until reconciling reads its final record and notes it again.

No tally (Redis lost its data, or a batch from before the tally): `counts` says None and status
counts from the records.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from farm.lifecycle import FINAL_STATES, JobRecord, JobState

PREFIX = "farm:tally:"
TOTAL = "#total"
TALLY_SECONDS = 30 * 24 * 3600   # as long as the batch's other notes in Redis
STATES = tuple(JobState)

# KEYS[1] the tally, KEYS[2] (optional) a worker's in-flight record to delete first: the ack
# of the message whose job this note makes final (farm/transport.py). ARGV: job, seq, state.
# Returns {changed, final jobs, total}, or nil when the batch has no tally. Inside: one read and
# at most one write of the tally (and the delete); INFO commandstats counts each of them.
_NOTE = """
if KEYS[2] then redis.call('DEL', KEYS[2]) end
local states = {'queued', 'running', 'latents_ready', 'refining', 'succeeded', 'failed',
                'canceled'}
local new = ARGV[3]
local fields = {'#total', ARGV[1]}
for i, s in ipairs(states) do fields[i + 2] = '#' .. s end
local got = redis.call('HMGET', KEYS[1], unpack(fields))
if not got[1] then return nil end
local count = {}
for i, s in ipairs(states) do count[s] = tonumber(got[i + 2]) or 0 end
local seq, old = -1, 'queued'
if got[2] then
  local at = string.find(got[2], ':', 1, true)
  seq, old = tonumber(string.sub(got[2], 1, at - 1)), string.sub(got[2], at + 1)
end
local changed = 0
if tonumber(ARGV[2]) > seq then
  if old ~= new then
    count[old], count[new] = count[old] - 1, count[new] + 1
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. new, '#' .. old, count[old],
               '#' .. new, count[new])
    changed = 1
  else
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. new)
  end
end
return {changed, count['succeeded'] + count['failed'] + count['canceled'], tonumber(got[1])}
"""

assert all(f"'{s.value}'" in _NOTE for s in JobState), "the note script must know every state"
assert all(f"count['{s.value}']" in _NOTE for s in FINAL_STATES), "and count every final one"

# KEYS[1] the tally; ARGV: ttl, then field, value pairs. Writes them only when no tally exists.
_START = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""


def tally_key(batch: str) -> str:
    return PREFIX + batch


@dataclass(frozen=True)
class Noted:
    """What a note found: whether it moved a count, and how far the batch is."""

    changed: bool
    final: int
    total: int

    @property
    def ended(self) -> bool:
        return self.final >= self.total


def start(client: Any, batch: str, total: int,
          records: dict[str, JobRecord] | None = None) -> bool:
    """Start the batch's tally (every job queued, or as `records` say); a tally that exists is
    left alone (a continued submit). False when one existed."""
    return bool(client.eval(_START, 1, tally_key(batch), TALLY_SECONDS,
                            *_fields(total, records or {})))


def reset(client: Any, batch: str, total: int, records: dict[str, JobRecord]) -> None:
    """Write the tally of a full recount (the batch ended: `records` are final), repairing
    whatever a process that died between its store write and its note left."""
    key = tally_key(batch)
    values = _fields(total, records)
    with client.pipeline() as pipe:
        pipe.hset(key, mapping=dict(zip(values[::2], values[1::2], strict=True)))
        pipe.expire(key, TALLY_SECONDS)
        pipe.execute()


def _fields(total: int, records: dict[str, JobRecord]) -> list[Any]:
    by_state = {s: 0 for s in STATES}
    by_state[JobState.QUEUED] = total
    fields: list[Any] = [TOTAL, total]
    for record in records.values():
        by_state[JobState.QUEUED] -= 1
        by_state[record.state] += 1
        fields += [record.job, f"{record.seq}:{record.state.value}"]
    for state, n in by_state.items():
        fields += ["#" + state.value, n]
    return fields


class Tally:
    """The note script registered once per client (EVALSHA: one command a note)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._note = client.register_script(_NOTE)

    def note(self, record: JobRecord, ack: str | None = None) -> Noted | None:
        """Count `record` (idempotent, order-free); None when its batch has no tally. `ack`:
        a key to delete in the same command, whether or not the batch has a tally (the
        in-flight record of the message whose job `record` ends: its ack)."""
        names = [tally_key(record.batch)] if ack is None else [tally_key(record.batch), ack]
        got = self._note(keys=names, args=[record.job, record.seq, record.state.value])
        if got is None:
            return None
        changed, final, total = (int(v) for v in got)
        return Noted(bool(changed), final, total)


def counts(client: Any, batch: str) -> tuple[int, dict[str, int]] | None:
    """(total, jobs per state) in one request; None when the batch has no tally."""
    names = [TOTAL, *("#" + s.value for s in STATES)]
    got = client.hmget(tally_key(batch), names)
    if got[0] is None:
        return None
    return int(got[0]), {s.value: max(0, int(v or 0)) for s, v in zip(STATES, got[1:],
                                                                       strict=True)}


def job_states(client: Any, batch: str) -> dict[str, JobState] | None:
    """Each noted job's state, as the tally counted it (one request); None without a tally."""
    raw = client.hgetall(tally_key(batch))
    if not raw:
        return None
    states = {}
    for name, value in raw.items():
        job = name.decode() if isinstance(name, bytes) else name
        if job.startswith("#"):
            continue
        states[job] = _state(value)
    return states


def _state(value: bytes | str) -> JobState:
    """The state in a job's tally field ("<seq>:<state>")."""
    text = value.decode() if isinstance(value, bytes) else value
    return JobState(text.split(":", 1)[1])


def final_count(by_state: dict[str, int]) -> int:
    return sum(by_state.get(s.value, 0) for s in FINAL_STATES)


def final_jobs(client: Any, batch: str, jobs: Iterable[str]) -> set[str]:
    """Which of `jobs` the tally counts in a final state (one HMGET per thousand)."""
    ids = list(jobs)
    out = set()
    for i in range(0, len(ids), 1000):
        chunk = ids[i:i + 1000]
        for job, value in zip(chunk, client.hmget(tally_key(batch), chunk), strict=True):
            if value and _state(value) in FINAL_STATES:
                out.add(job)
    return out
