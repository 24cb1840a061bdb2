"""`python -m embedded`: the whole service on this machine (redis-server, one worker, the API, local storage,
the embedded tiny bundle), then one job through HTTP: the image and caption are submitted, followed live to
the end, and the WAV is downloaded; its path is printed.

Storage, logs and Redis data live under --workdir; the tiny bundle is the one `melfusion generate` uses
($MELFUSION_HOME, default ~/.cache/melfusion). The processes stop when this exits unless --keep-running is
given; then the demo page is at http://127.0.0.1:PORT/ and the API reference at /docs, and Ctrl+C or SIGTERM
stops them all.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from melfusion.cpus import let_idle_threads_sleep
from melfusion_client import MelFusionClient

from .processes import (
    PROJECT_ROOT,
    free_port,
    port_is_free,
    settings_env,
    start_api,
    start_redis,
    start_worker,
    wait_until,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m embedded",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--image", type=Path, default=PROJECT_ROOT / "docs" / "sample.png",
                        help="JPEG, PNG or WebP to submit; default docs/sample.png")
    parser.add_argument("--caption", default="calm piano at sunset", help="the music to ask for; default %(default)r")
    parser.add_argument("--seconds", type=float, default=4.0, help="clip length; default %(default)s")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps; default %(default)s")
    parser.add_argument("--workdir", type=Path, default=Path("outputs/embedded"),
                        help="storage, logs and Redis data; default %(default)s")
    parser.add_argument("--port", type=int, default=8000, help="API port (0 = any free port); default %(default)s")
    parser.add_argument("--keep-running", action="store_true",
                        help="leave the stack up (demo page at /, API reference at /docs); Ctrl+C or SIGTERM stops it")
    return parser.parse_args()


def show_progress(job) -> None:
    """One line rewritten in place on a terminal; a line per change in a log."""
    print(f"  {job.status:9} {job.progress:4.0%}", end="\r" if sys.stdout.isatty() else "\n", flush=True)


def stop_on_sigterm(signum, frame) -> None:
    """SIGTERM ends this process as Ctrl+C does: through the `finally` that stops the children."""
    raise SystemExit(128 + signum)


def main() -> int:
    args = parse_args()
    if args.port and not port_is_free(args.port):
        raise SystemExit(f"python -m embedded: port {args.port} is in use; free it, or pass --port N (0: any free)")
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    workdir = args.workdir.resolve()
    let_idle_threads_sleep()  # before torch loads, here and in the worker, which inherits it
    from melfusion.bundle import ensure_tiny_bundle  # imports torch; the API then reads this bundle torch-free
    from melfusion.quiet import silence_library_noise

    silence_library_noise()
    bundle = ensure_tiny_bundle()  # the same place `melfusion generate` uses
    redis_port, api_port = free_port(), args.port or free_port()
    env = settings_env(
        redis_url=f"redis://127.0.0.1:{redis_port}/0",
        bundle_dir=bundle,
        storage_dir=workdir / "storage",
        host="127.0.0.1",
        port=api_port,
    )
    logs = workdir / "logs"
    children = [start_redis(port=redis_port, data_dir=workdir / "redis", install=True)]
    try:
        children.append(start_worker(env=env, log_dir=logs))
        children.append(start_api(env=env, log_dir=logs))
        base_url = f"http://127.0.0.1:{api_port}"
        with MelFusionClient(base_url) as client:
            wait_until(client.workers_available, timeout=120, what="a warmed-up worker (/readyz)")
            started = time.perf_counter()
            job = client.submit(args.image, args.caption, seconds=args.seconds, steps=args.steps)
            print(f"submitted job {job.id} to {base_url}/jobs/{job.id}", flush=True)
            job = client.wait(job.id, on_progress=show_progress)
            if sys.stdout.isatty():
                print()
            if job.status != "succeeded":
                print(f"job {job.status}: {job.error}; logs in {logs}")
                return 1
            path = client.download(job, workdir / f"{job.id}.wav")
            took = time.perf_counter() - started
            result = job.result
            print(f"wrote {path} ({result['seconds']:g} s at {result['sample_rate']} Hz, seed {job.params['seed']}, "
                  f"sha256 {result['sha256'][:12]}…; submit to download {took:.1f} s)")  # fmt: skip
        if args.keep_running:
            print(f"demo page at {base_url}/, API reference at {base_url}/docs; Ctrl+C stops it", flush=True)
            children[-1].popen.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the stopping is under way
        for child in reversed(children):
            child.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
