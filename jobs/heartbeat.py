"""Worker heartbeats: one Redis sorted set of worker names scored by when each beat expires, beside a hash
of their states. Reading them costs O(workers), whatever else Redis holds (a SCAN for per-worker keys
cost O(all keys): 0.94 s with a million job keys, and every job keeps several for a day).

RQ's own worker heartbeat stops while a SimpleWorker runs a job (the job runs in the worker's only
thread), so workers beat from a background thread and /readyz reads these instead. Expiry is judged by
the Redis server's clock (TIME inside the scripts), so API and worker hosts need not agree on the time;
each beat also drops the states of workers whose beat expired.
"""

from __future__ import annotations

import json

from redis import Redis
from redis.commands.core import Script

from .queue import KEY_PREFIX

WORKERS = f"{KEY_PREFIX}:workers"  # sorted set: worker name -> expiry of its last beat (ms, Redis clock)
STATES = f"{KEY_PREFIX}:workers:states"  # hash: worker name -> its last state (JSON)

_NOW_MS = "local now = redis.call('TIME') local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)"
_WRITE = Script(None, f"""{_NOW_MS}
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if #expired > 0 then
  redis.call('ZREM', KEYS[1], unpack(expired))
  redis.call('HDEL', KEYS[2], unpack(expired))
end
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
""".encode())  # EVALSHA: the script is sent once per Redis server, not with every beat
_READ = Script(None, f"""{_NOW_MS}
local alive = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now_ms, '+inf')
if #alive == 0 then return {{}} end
return redis.call('HMGET', KEYS[2], unpack(alive))
""".encode())


def write_heartbeat(redis: Redis, worker_name: str, state: dict, *, ttl_seconds: float) -> None:
    _WRITE(keys=[WORKERS, STATES], args=[worker_name, int(ttl_seconds * 1000), json.dumps(state)], client=redis)


def clear_heartbeat(redis: Redis, worker_name: str) -> None:
    with redis.pipeline(transaction=True) as pipe:
        pipe.zrem(WORKERS, worker_name)
        pipe.hdel(STATES, worker_name)
        pipe.execute()


def read_heartbeats(redis: Redis) -> list[dict]:
    """The states of all workers that beat recently."""
    return [json.loads(value) for value in _READ(keys=[WORKERS, STATES], client=redis) if value]
