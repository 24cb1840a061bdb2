"""`python -m workers`: one warm worker on the configured queue (settings from MELFUSION_* or flags)."""

from __future__ import annotations

import argparse
import logging

from rq.serializers import JSONSerializer

from jobs.queue import open_queue, open_redis
from jobs.settings import load_settings
from jobs.storage import open_storage
from melfusion.cpus import set_torch_threads
from melfusion.errors import BundleError
from melfusion.quiet import silence_library_noise

from .warm import Runtime, install_runtime
from .worker import MelFusionWorker


def parse_overrides(argv: list[str] | None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m workers", description="Run one warm MelFusion worker.")
    parser.add_argument("--queue", dest="queue_name", help="queue name (MELFUSION_QUEUE_NAME)")
    parser.add_argument("--bundle", dest="bundle_dir", help="model bundle folder (MELFUSION_BUNDLE_DIR)")
    parser.add_argument("--device", help="torch device, e.g. cuda:0 (MELFUSION_DEVICE)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="(MELFUSION_DTYPE)")
    return {key: value for key, value in vars(parser.parse_args(argv)).items() if value is not None}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    silence_library_noise()  # no loading bars or library notices in the log: our own lines say what happened
    settings = load_settings(**parse_overrides(argv))
    set_torch_threads(settings.torch_threads)  # unset: the cores this container may use, not the machine's
    redis = open_redis(settings)
    runtime = Runtime(settings=settings, storage=open_storage(settings))
    try:
        runtime.get_pipeline()  # load before taking jobs: the first job pays no load, and a bad bundle fails here
    except BundleError as exc:
        raise SystemExit(f"cannot load the model bundle: {exc}") from None
    install_runtime(runtime)
    worker = MelFusionWorker(
        [open_queue(redis, settings)], connection=redis, serializer=JSONSerializer, runtime=runtime
    )
    worker.work(logging_level="INFO")
    return 0
