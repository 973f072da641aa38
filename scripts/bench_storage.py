#!/usr/bin/env python
"""Checkpoint save and restore throughput: a local directory vs a bucket.

Saves a sharded state of `--mb` MiB (float32 arrays over the 8 emulated CPU devices) with the
training loop's own `Checkpointer` (synchronous save, committed with its marker), then restores
it with `restore_latest` onto another layout, `--repeats` times per target, and prints MB/s.

Targets: a local directory (always), `--bucket gs://...` (a real bucket: default credentials),
or `--emulator` (tests/gcs_emulator.py on loopback: the bucket code path, but not GCS's
latency or bandwidth; its figure says what the path costs on this machine, not what a TPU VM
gets from GCS).

    python scripts/bench_storage.py --emulator --mb 256
    python scripts/bench_storage.py --bucket gs://my-bucket/bench --mb 2048
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(location: str, mb: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from infra import paths
    from infra.checkpoint import Checkpointer
    from tests.helpers import Position

    rows = NamedSharding(jax.make_mesh((8,), ("data",)), P("data"))
    leaves = 8
    n = mb * 2**20 // 4 // leaves // 1024
    state = {f"w{i}": jax.device_put(jax.random.normal(jax.random.key(i), (n, 1024)), rows)
             for i in range(leaves)}
    state["step"] = jnp.int32(0)
    size = sum(x.nbytes for x in jax.tree.leaves(state)) / 1e6
    grid = NamedSharding(jax.make_mesh((4, 2), ("a", "b")), P("b", "a"))
    scalar = NamedSharding(grid.mesh, P())
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=grid if v.ndim else scalar)
                for k, v in state.items()}
    saves, restores = [], []
    for r in range(repeats):
        directory = paths.path(location) / f"run{r}"
        ckpt = Checkpointer(directory, every=1, keep=1, async_save=False)
        start = time.perf_counter()
        ckpt.save(1, state, Position(), {})
        ckpt.wait()
        saves.append(time.perf_counter() - start)
        ckpt.close()
        reader = Checkpointer(directory, every=1, keep=1)
        start = time.perf_counter()
        restored, _, _ = reader.restore_latest(abstract, lambda s: Position())
        jax.block_until_ready(restored)
        restores.append(time.perf_counter() - start)
        reader.close()
        np.testing.assert_array_equal(np.asarray(restored["w0"]), np.asarray(state["w0"]))
    return {"target": location, "mb": round(size, 1),
            "save_mb_per_s": round(size / statistics.median(saves), 1),
            "restore_mb_per_s": round(size / statistics.median(restores), 1),
            "save_s": [round(s, 3) for s in saves], "restore_s": [round(s, 3) for s in restores]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=256, help="state size in MiB")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bucket", default=None, help="gs://bucket/prefix to measure")
    p.add_argument("--emulator", action="store_true", help="measure a loopback GCS emulator")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from infra import process

    process.setup()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        results.append(measure(str(Path(tmp) / "local"), args.mb, args.repeats))
        if args.bucket:
            results.append(measure(args.bucket.rstrip("/"), args.mb, args.repeats))
        if args.emulator:
            from tests.gcs_emulator import Emulator

            emulator = Emulator(Path(tmp) / "gcs").start()
            os.environ.update(emulator.env)
            try:
                results.append(measure("gs://bkt/bench", args.mb, args.repeats))
            finally:
                emulator.stop()
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'target':<40} {'MB':>8} {'save MB/s':>10} {'restore MB/s':>13}")
    for r in results:
        print(f"{r['target']:<40} {r['mb']:>8} {r['save_mb_per_s']:>10} {r['restore_mb_per_s']:>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
