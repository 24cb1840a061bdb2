"""Load on one API process: POST /jobs plus GET /jobs/{id} at a stated rate, with an asyncio httpx client.

By default it starts its own redis-server and API (tiny bundle, local storage, no worker, so it measures the
API: jobs stay queued; rate limit off, queue bound raised); `--url` targets a running API instead. Prints
p50/p99 latency per operation and the error count. Not run by CI. From the repository root:

    python -m bench.load --rate 20 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from embedded.processes import PROJECT_ROOT, free_port, settings_env, start_api, start_redis

SAMPLE = PROJECT_ROOT / "docs" / "sample.png"


async def one_round(http: httpx.AsyncClient, image: bytes, latencies: dict[str, list[float]], errors: list[str]):
    """A POST, then a GET of the job it created."""
    started = time.perf_counter()
    try:
        created = await http.post("/jobs", data={"caption": "load", "seconds": "1", "steps": "2"},
                                  files={"image": ("sample.png", image, "image/png")})  # fmt: skip
        latencies["POST /jobs"].append(time.perf_counter() - started)
        if created.status_code != 202:
            errors.append(f"POST {created.status_code}")
            return
        started = time.perf_counter()
        got = await http.get(f"/jobs/{created.json()['id']}")
        latencies["GET /jobs/{id}"].append(time.perf_counter() - started)
        if got.status_code != 200:
            errors.append(f"GET {got.status_code}")
    except httpx.HTTPError as exc:
        errors.append(type(exc).__name__)


async def drive(url: str, *, rate: float, duration: float, api_key: str | None) -> None:
    image = SAMPLE.read_bytes()
    latencies: dict[str, list[float]] = {"POST /jobs": [], "GET /jobs/{id}": []}
    errors: list[str] = []
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30, limits=limits) as http:
        tasks, started = [], time.perf_counter()
        for i in range(int(rate * duration)):  # open loop: rounds start on schedule, however slow answers are
            await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one_round(http, image, latencies, errors)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    print(f"{len(tasks)} rounds (POST + GET) at {rate:g}/s over {elapsed:.1f} s; errors: {len(errors)}"
          + (f" ({', '.join(sorted(set(errors)))})" if errors else ""))  # fmt: skip
    for name, values in latencies.items():
        if values:
            p50, p99 = statistics.quantiles(values, n=100)[49], statistics.quantiles(values, n=100)[98]
            print(f"  {name:15s} n={len(values):5d}  p50 {p50 * 1000:7.1f} ms  p99 {p99 * 1000:7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=20.0, help="rounds (POST + GET) started per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--url", help="a running API (default: start redis-server + one API here)")
    parser.add_argument("--api-key", help="sent as a Bearer token, for an API with MELFUSION_API_KEYS")
    args = parser.parse_args()
    if args.url:
        asyncio.run(drive(args.url, rate=args.rate, duration=args.duration, api_key=args.api_key))
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        redis_port = free_port()
        redis = start_redis(port=redis_port, data_dir=workdir / "redis")
        env = settings_env(redis_url=f"redis://127.0.0.1:{redis_port}/0", storage_dir=workdir / "storage",
                           host="127.0.0.1", port=free_port(), rate_limit="", max_queue_depth=1_000_000)  # fmt: skip
        api = start_api(env=env, log_dir=workdir)
        try:
            url = f"http://127.0.0.1:{env['MELFUSION_PORT']}"
            asyncio.run(drive(url, rate=args.rate, duration=args.duration, api_key=None))
        finally:
            api.stop()
            redis.stop()


if __name__ == "__main__":
    main()
