"""bench.gpu runs every part it measures on a GPU (engine, compiled, service), here on the CPU at tiny size
(the service's eager modes run the same code with other worker settings)."""

from __future__ import annotations

from bench.gpu import main


def test_gpu_benchmark_runs_every_part_on_the_cpu_at_tiny_size(capsys, tmp_path):
    main(["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--compile", "check", "--seconds", "0.5",
          "--steps", "2", "--repeats", "1", "--batches", "2", "--compiled-batches", "1", "--parts", "engine",
          "compiled", "service", "--service-modes", "compiled", "--service-jobs", "2", "--service-batch-sizes", "1",
          "--service-image-backend", "same", "--markdown", str(tmp_path / "table.md")])  # fmt: skip
    table = (tmp_path / "table.md").read_text()
    for case in ("eager: 2 new photos, image side in one pass", "compiled: new image, batch 1",
                 "compiled vs eager, same request: max |difference| | 0.00e+00",
                 "compiled: graphs compiled after warm-up | 0 |",
                 "service: 2 concurrent mixed jobs, compiled (check), batched (warmed [1])"):  # fmt: skip
        assert case in table, case
    assert "compile misses after warm-up 0" in table
