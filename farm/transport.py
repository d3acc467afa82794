"""The farm's kombu transport: kombu's Redis transport with a publish batch's messages sent in
one LPUSH per queue, and its late-ack bookkeeping written in fewer commands.

A publish batch (`producer.batch()`, scheduler/submit.py) buffers one LPUSH per message in a
pipeline; here the LPUSHes onto one list go out as one LPUSH of all their values, in the same
order (LPUSH k a b is LPUSH k a, then LPUSH k b), so a batch of a thousand jobs costs the
server one command per queue it uses, not a thousand.

kombu notes every message it delivers in two keys, `unacked_index` (a sorted set: tag → when)
and `unacked` (a hash: tag → the message), and removes both on ack; each pair goes out as a
MULTI/EXEC transaction, four commands where two do the work.

A worker's channel (transport option `farm_worker`: its name) notes a delivery in one command
instead: SET `farm:inflight:<worker>`, the worker's in-flight record (farm/recovery.py), with
the message in it; the ack deletes the record (DEL). Two commands a message, where kombu's notes
and the record took five. The record is what the sweep gives back when the worker stops
beating, and what a reject with requeue (a retryable fault) or kombu's restore at shutdown
moves back onto the queue (`restore_by_tag`: the record's message, in one transaction with the
record's delete). One record holds one message: the solo pool takes the next message only
after acking the last, and a delivery that finds the record still holding an unacked one
(which the farm's settings never make) is noted kombu's way.

Most messages need no DEL of their own: the worker's tally note that makes the message's job
final deletes the record in the same command (worker/finisher.py, farm/tally.py), and says so
here (`settled`); kombu's ack of that message then sends nothing, and a put-back of it puts
nothing back (its job has ended). One command a message, beside the note.

Any other channel (the throughput mode's taker, worker/batching.py) keeps kombu's notes, each
pair in one pipelined round trip without MULTI/EXEC, in an order that makes a half-applied
pair safe (Redis runs a connection's commands in the order they arrive, so a process killed
mid-send leaves at most a prefix of them applied):

    deliver   ZADD unacked_index, then HSET unacked. A lone ZADD names no message: kombu's
              restore and farm/recovery.py skip it (and drop it); the message it stood for
              was already taken by BRPOP and is found by reconciling (farm/recovery.py
              missing_jobs), as after kombu#305. An `unacked` entry no in-flight record
              names is an orphan the sweep puts back (farm/recovery.py restore_orphans).
    ack       HDEL unacked, then ZREM unacked_index. A lone HDEL leaves the same harmless
              index entry; the message is gone, as an ack means.

A put-back of a message in `unacked` (`restore_by_tag`) keeps kombu's WATCH/MULTI transaction:
it moves a message and must never duplicate or drop it.

The channel also keeps one redis-py client for those notes instead of making one per call,
and packs the BRPOP it sends before each message once for as long as its queues stay the same.

Celery picks the class by name (`broker.celery_app`): `Transport` for
redis:// and rediss:// URLs, `SocketTransport` for the embedded broker's unix socket.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from time import monotonic, time
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

from farm import recovery

# The message each worker's in-flight record holds, in this process (worker name -> delivery
# tag), and the tags whose record is already deleted: the worker's tally note that made the
# job final deleted it in the same command (farm/tally.py `note(..., ack=)`, worker/finisher.py),
# which acks the message. kombu's ack of such a tag sends nothing, and a put-back of it puts
# nothing back: the job has ended.
_holding: dict[str, str] = {}
_settled: set[str] = set()


def holding(worker: str) -> str | None:
    """The delivery tag of the message `worker`'s in-flight record holds, if any."""
    return _holding.get(worker)


def settled(worker: str, tag: str) -> None:
    """`worker`'s in-flight record for `tag` was deleted with its job's final note: kombu's
    ack of `tag` has nothing left to do."""
    if _holding.get(worker) == tag:
        _settled.add(tag)


class QoS(kombu_redis.QoS):
    # the tag of the message this worker's in-flight record holds, until its ack or put-back
    _recorded: str | None = None

    @contextmanager
    def pipe_or_acquire(self, pipe: Any = None, client: Any = None) -> Iterator[Any]:
        if pipe:
            yield pipe
        else:
            with self.channel.conn_or_acquire(client) as conn:
                yield conn.pipeline(transaction=False)

    def append(self, message: Any, delivery_tag: str) -> None:
        delivery = message.delivery_info
        entry = [message._raw, delivery["exchange"], delivery["routing_key"]]
        worker = self.channel.farm_worker
        with self.channel.conn_or_acquire() as client:
            if worker and self._recorded is None:
                job, stage = recovery.body_job(message.body)
                client.set(recovery.INFLIGHT + worker,
                           recovery.claim(delivery_tag, delivery["routing_key"], job, stage,
                                          entry=entry))
                # a tag settled on a connection that was lost before its ack is never acked
                _settled.discard(_holding.get(worker, ""))
                self._recorded = _holding[worker] = delivery_tag
            else:
                client.pipeline(transaction=False) \
                    .zadd(self.unacked_index_key, {delivery_tag: time()}) \
                    .hset(self.unacked_key, delivery_tag, dumps(entry)) \
                    .execute()
        # kombu's in-process note of the delivery (virtual.QoS), as its own append makes
        super(kombu_redis.QoS, self).append(message, delivery_tag)

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None) -> Any:
        with self.pipe_or_acquire(pipe) as p:
            if delivery_tag == self._recorded:
                if self._forget_recorded():
                    return p   # deleted with the job's final note: nothing to send
                return p.delete(recovery.INFLIGHT + self.channel.farm_worker)
            return p.hdel(self.unacked_key, delivery_tag) \
                    .zrem(self.unacked_index_key, delivery_tag)

    def _forget_recorded(self) -> bool:
        """The record's message is acked or put back: forget it. True when the worker's final
        note already deleted the record."""
        tag, self._recorded = self._recorded, None
        worker = self.channel.farm_worker
        if worker and _holding.get(worker) == tag:
            del _holding[worker]
        if tag in _settled:
            _settled.discard(tag)
            return True
        return False

    def restore_by_tag(self, tag: str, client: Any = None, leftmost: bool = False) -> None:
        if tag != self._recorded:
            return super().restore_by_tag(tag, client=client, leftmost=leftmost)
        if self._forget_recorded():
            return None   # its job ended (and its record is gone): nothing goes back
        with self.channel.conn_or_acquire(client) as conn:
            recovery.restore_record(conn, self.channel.farm_worker, tag, leftmost=leftmost)
        return None


class _Coalescing:
    """A pipeline that gathers the LPUSHes onto each list and queues them as one LPUSH per list
    when anything else is queued or the pipeline runs (kombu's publish batch adds PEXPIRE and
    PUBLISH too: those go after the pushes before them, as they were added)."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe
        self._values: dict[str, list[Any]] = {}

    def lpush(self, key: str, value: Any) -> _Coalescing:
        self._values.setdefault(key, []).append(value)
        return self

    def _push(self) -> None:
        for key, values in self._values.items():
            self._pipe.lpush(key, *values)
        self._values = {}

    def execute(self) -> Any:
        self._push()
        return self._pipe.execute()

    def reset(self) -> None:
        self._values = {}
        self._pipe.reset()

    def __getattr__(self, name: str) -> Any:
        self._push()
        return getattr(self._pipe, name)


class PublishBatch(kombu_redis.PublishBatch):
    def __init__(self, channel: Any, max_size: int) -> None:
        super().__init__(channel, max_size)
        self.pipeline = _Coalescing(self.pipeline)


class Channel(kombu_redis.Channel):
    QoS = QoS
    # the worker whose in-flight record each delivery writes (transport option "farm_worker");
    # None: no record (the throughput mode's own taking, which writes one for all it holds)
    farm_worker: str | None = None
    from_transport_options = (*kombu_redis.Channel.from_transport_options,  # type: ignore[assignment]
                              "farm_worker")
    _sync_client: Any = None

    # the BRPOP a worker sends before each message, packed: (what it was packed for, chunks)
    _brpop_packed: tuple[Any, tuple[bytes, ...]] = (None, ())

    def create_publish_batch(self, max_size: int) -> PublishBatch:
        return PublishBatch(self, max_size)

    def _brpop_start(self, timeout: Any = None) -> None:
        """kombu's, with the command packed once for as long as the queues it lists stay the
        same: a worker lists every priority of every class it serves (80 keys for one model on
        the largest class), and packing them before every message took about 4 % of a
        stand-in worker's time (docs/scaling.md)."""
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        connection = self.client.connection
        made_for = (tuple(queues), timeout, self.global_keyprefix, tuple(self.priority_steps),
                    connection)
        if self._brpop_packed[0] != made_for:
            keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps
                    for queue in queues] + [timeout or 0]
            args = ["BRPOP", *keys]
            if self.global_keyprefix:
                args = self.client._prefix_args(args)
            self._brpop_packed = (made_for, tuple(connection.pack_command(*args)))
        self._in_poll = connection
        self._brpop_sent_at = monotonic()  # type: ignore[assignment]  # kombu: None at first
        connection.send_packed_command(self._brpop_packed[1])

    def _restore(self, message: Any, leftmost: bool = False) -> None:
        if message.delivery_tag == self.qos._recorded:
            return self.qos.restore_by_tag(message.delivery_tag, leftmost=leftmost)
        return super()._restore(message, leftmost)

    def _create_client(self, asynchronous: bool = False) -> Any:
        """kombu makes a new redis-py client for every ack and delivery note (each builds
        its table of response callbacks, about 0.2 ms); one per connection pool serves them
        all. A client holds no connection itself: each command takes one from the pool."""
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool
        client = self._sync_client
        if client is None or client.connection_pool is not pool:
            client = self._sync_client = super()._create_client()
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel


class SocketTransport(Transport):
    """The same over a unix socket: Celery hands it `socket:///path` unparsed, which kombu's
    Redis channel connects to as it does for `redis+socket://` URLs."""

    can_parse_url = True


TRANSPORT = f"{__name__}:Transport"
SOCKET_TRANSPORT = f"{__name__}:SocketTransport"
