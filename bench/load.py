"""Load on one API process: POST /jobs plus GET /jobs/{id} at a stated rate, event streams and `Prefer: wait`
requests held open meanwhile, and /livez probed throughout, with an asyncio httpx client.

By default it starts its own redis-server and API (tiny bundle, local storage, no worker, so it measures the
API: jobs stay queued; rate limit off, queue bound and stream cap raised); `--url` targets a running API
instead. `--streams N` opens N event streams (on jobs of their own, 30 per job) before the load starts and
holds them; `--waits N` sends N `Prefer: wait` POSTs at the start (without a worker each is held the whole
wait, then answered 202). At the end the streams' jobs are canceled, which must end every stream with its
`completed` event. Prints p50/p99 latency per operation, how many streams and waits were served, the
/livez latency (probed from another process, so this one's crowd does not delay it) and the errors. Not run
by CI. From the repository root:

    python -m bench.load --rate 20 --duration 60 --streams 300 --waits 120
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from embedded.processes import PROJECT_ROOT, free_port, settings_env, start_api, start_redis

SAMPLE = PROJECT_ROOT / "docs" / "sample.png"
FORM = {"caption": "load", "seconds": "1", "steps": "2"}
STREAMS_PER_JOB = 30
LIVEZ_PROBE = """
import sys, time, httpx
with httpx.Client(base_url=sys.argv[1], timeout=30) as http:
    while True:
        started = time.monotonic()
        assert http.get("/livez").status_code == 200
        print(time.monotonic() - started, flush=True)
        time.sleep(0.1)
"""


async def probe_livez(url: str, stop: asyncio.Event) -> list[float]:
    """Seconds of each /livez answer, probed every 0.1 s by another process until `stop` is set."""
    probe = await asyncio.create_subprocess_exec(sys.executable, "-c", LIVEZ_PROBE, url,
                                                 stdout=asyncio.subprocess.PIPE)  # fmt: skip
    seconds = []
    while line := await probe.stdout.readline():
        if stop.is_set():
            probe.terminate()
        seconds.append(float(line))
    await probe.wait()
    return seconds


async def post_job(http: httpx.AsyncClient, image: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return await http.post("/jobs", data=FORM, files={"image": ("sample.png", image, "image/png")}, headers=headers)


async def one_round(http: httpx.AsyncClient, image: bytes, latencies: dict[str, list[float]], errors: list[str]):
    """A POST, then a GET of the job it created."""
    started = time.perf_counter()
    try:
        created = await post_job(http, image)
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


async def follow(http: httpx.AsyncClient, job_id: str, first_events: list[float], errors: list[str]) -> str | None:
    """Read one event stream to its end; the name of its last event (None if it failed)."""
    started, last = time.perf_counter(), None
    try:
        async with http.stream("GET", f"/jobs/{job_id}/events") as response:
            if response.status_code != 200:
                errors.append(f"stream {response.status_code}")
                return None
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    if last is None:
                        first_events.append(time.perf_counter() - started)
                    last = line.removeprefix("event:").strip()
    except httpx.HTTPError as exc:
        errors.append(f"stream {type(exc).__name__}")
        return None
    return last


async def wait_post(http: httpx.AsyncClient, image: bytes, seconds: int, latencies: list[float], errors: list[str]):
    started = time.perf_counter()
    try:
        answer = await post_job(http, image, headers={"Prefer": f"wait={seconds}"})
    except httpx.HTTPError as exc:
        errors.append(f"wait {type(exc).__name__}")
        return None
    latencies.append(time.perf_counter() - started)
    if answer.status_code not in (201, 202):
        errors.append(f"wait {answer.status_code}")
    return answer.status_code


def quantiles(values: list[float]) -> str:
    if len(values) < 2:
        return f"n={len(values)}"
    cuts = statistics.quantiles(values, n=100)
    p50, p99, top = (1000 * value for value in (cuts[49], cuts[98], max(values)))
    return f"n={len(values):5d}  p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  max {top:7.1f} ms"


async def drive(url: str, *, rate: float, duration: float, streams: int, waits: int, wait_seconds: int,
                api_key: str | None) -> None:  # fmt: skip
    image = SAMPLE.read_bytes()
    latencies: dict[str, list[float]] = {"POST /jobs": [], "GET /jobs/{id}": []}
    first_events: list[float] = []
    wait_latencies: list[float] = []
    errors: list[str] = []
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=streams + waits + 200, max_keepalive_connections=100)
    stop_probing = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=wait_seconds + 60, limits=limits) as http:
        prober = asyncio.create_task(probe_livez(url, stop_probing))
        stream_jobs = [(await post_job(http, image)).json()["id"] for _ in range(-(-streams // STREAMS_PER_JOB))]
        followers = [asyncio.create_task(follow(http, stream_jobs[i // STREAMS_PER_JOB], first_events, errors))
                     for i in range(streams)]  # fmt: skip
        waiting = [asyncio.create_task(wait_post(http, image, wait_seconds, wait_latencies, errors))
                   for _ in range(waits)]  # fmt: skip
        rounds, started = [], time.perf_counter()
        for i in range(int(rate * duration)):  # open loop: rounds start on schedule, however slow answers are
            await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
            rounds.append(asyncio.create_task(one_round(http, image, latencies, errors)))
        await asyncio.gather(*rounds)
        elapsed = time.perf_counter() - started
        waited = Counter(await asyncio.gather(*waiting))
        for job_id in stream_jobs:
            await http.post(f"/jobs/{job_id}/cancel")
        ends = Counter(await asyncio.gather(*followers))
        stop_probing.set()
        livez = await prober
    print(f"{len(rounds)} rounds (POST + GET) at {rate:g}/s over {elapsed:.1f} s; errors: {len(errors)}"
          + (f" ({', '.join(f'{n}x {e}' for e, n in Counter(errors).most_common())})" if errors else ""))  # fmt: skip
    for name, values in latencies.items():
        print(f"  {name:17s} {quantiles(values)}")
    if streams:
        print(f"  event streams     {len(first_events)}/{streams} got their first event "
              f"({quantiles(first_events)}); {ends['completed']}/{streams} ended with `completed` after a cancel")
    if waits:
        answers = ", ".join(f"{n}x {status}" for status, n in sorted(waited.items(), key=str))
        print(f"  Prefer: wait={wait_seconds} {len(wait_latencies)}/{waits} answered ({answers}); "
              f"{quantiles(wait_latencies)}")
    print(f"  /livez            {quantiles(livez)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=20.0, help="rounds (POST + GET) started per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--streams", type=int, default=0, help="event streams held open during the load")
    parser.add_argument("--waits", type=int, default=0, help="`Prefer: wait` POSTs sent at the start")
    parser.add_argument("--wait-seconds", type=int, default=30,
                        help="N of their `Prefer: wait=N`; default %(default)s")
    parser.add_argument("--url", help="a running API (default: start redis-server + one API here)")
    parser.add_argument("--api-key", help="sent as a Bearer token, for an API with MELFUSION_API_KEYS")
    args = parser.parse_args()

    def run(url: str, api_key: str | None) -> None:
        asyncio.run(drive(url, rate=args.rate, duration=args.duration, streams=args.streams, waits=args.waits,
                          wait_seconds=args.wait_seconds, api_key=api_key))  # fmt: skip

    if args.url:
        run(args.url, args.api_key)
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        redis_port = free_port()
        redis = start_redis(port=redis_port, data_dir=workdir / "redis")
        env = settings_env(redis_url=f"redis://127.0.0.1:{redis_port}/0", storage_dir=workdir / "storage",
                           host="127.0.0.1", port=free_port(), rate_limit="", max_queue_depth=1_000_000,
                           max_streams_per_client=args.streams + args.waits + 1,
                           prefer_wait_max_seconds=args.wait_seconds)  # fmt: skip
        api = start_api(env=env, log_dir=workdir)
        try:
            run(f"http://127.0.0.1:{env['MELFUSION_PORT']}", None)
        finally:
            api.stop()
            redis.stop()


if __name__ == "__main__":
    main()
