"""The matmul peak of this machine's devices: what a benchmark's FLOP/s are measured against (MFU), taken in
the same run on the same devices, since machines of one kind differ and are shared."""

from __future__ import annotations

import math
import time


def _best_matmul(mesh, n: int, dtype, repeats: int) -> tuple[float, float]:
    """(seconds, CPU-seconds), each the best of `repeats`, of (devices*n x n) @ (n x n) on the mesh;
    float32 accumulation and output whatever the input dtype."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    a = jax.device_put(jax.random.normal(jax.random.key(0), (mesh.size * n, n), dtype),
                       NamedSharding(mesh, PartitionSpec("data")))
    b = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), dtype), NamedSharding(mesh, PartitionSpec()))
    matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    matmul(a, b).block_until_ready()
    best, best_cpu = math.inf, math.inf
    for _ in range(repeats):
        t0, cpu0 = time.perf_counter(), time.process_time()
        matmul(a, b).block_until_ready()
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - cpu0)
    return best, best_cpu


def measure_peak(sizes: tuple[int, ...], repeats: int = 5, max_single_s: float = 2.0) -> dict:
    """Best float32 FLOP/s of an n x n @ n x n matmul on every local device at once (after a warm-up,
    best of `repeats`), over `sizes` (stopping early when one product takes over `max_single_s`);
    and, at the best size, a bfloat16 one with float32 accumulation (the peak of bfloat16 models).

    Also FLOPs per CPU-second of this process (all its threads): on a machine shared with other
    work, wall-clock rates drop with the neighbours' load while per-CPU-second rates barely move, so
    `mfu.*_cpu_time` compares the loop and the matmul by the CPU time each was actually given.
    """
    import jax.numpy as jnp

    from epo_tui.engine.search import local_mesh

    mesh = local_mesh()
    per_size, per_cpu = {}, {}
    for n in sizes:
        best, best_cpu = _best_matmul(mesh, n, jnp.float32, repeats)
        flops = 2 * mesh.size * n**3
        per_size[n], per_cpu[n] = flops / best, flops / best_cpu
        if best > max_single_s:
            break
    size = max(per_size, key=per_size.get)
    bf16, bf16_cpu = _best_matmul(mesh, size, jnp.bfloat16, repeats)
    return {"flops_per_s": per_size[size], "size": size, "dtype": "float32", "devices": mesh.size,
            "repeats": repeats, "per_size_flops_per_s": {str(k): v for k, v in per_size.items()},
            "flops_per_cpu_s": max(per_cpu.values()),
            "bfloat16_flops_per_s": 2 * mesh.size * size**3 / bf16,
            "bfloat16_flops_per_cpu_s": 2 * mesh.size * size**3 / bf16_cpu}
