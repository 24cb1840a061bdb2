"""`python -m workers.healthcheck`: exit 0 if a worker on this host beat recently (the container healthcheck)."""

from __future__ import annotations

import socket

from redis import Redis

from jobs.heartbeat import read_heartbeats
from jobs.settings import load_settings


def main() -> int:
    settings = load_settings()
    beats = read_heartbeats(Redis.from_url(settings.redis_url, socket_timeout=5))
    alive = [beat for beat in beats if beat.get("host") == socket.gethostname()]
    print(f"{len(alive)} fresh worker heartbeat(s) from {socket.gethostname()}")
    return 0 if alive else 1


if __name__ == "__main__":
    raise SystemExit(main())
