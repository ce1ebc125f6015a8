"""Several processes (one per host) sharing one batch: `jax.distributed` set-up, each process's share
of the features, and one gather of the per-feature summaries to every process (process 0 writes them).

A batch runs distributed when it is given
  - the flags `--coordinator HOST:PORT --num-processes P --process-id I`, or
  - `JAX_COORDINATOR_ADDRESS` (read by jax) with `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` (read by
    epo-tui; jax has no variables of its own for these two), or
  - a cluster manager's variables that `jax.distributed.initialize()` auto-detects, when they describe
    more than one process: Slurm (`SLURM_JOB_ID`, `SLURM_STEP_NODELIST`, `SLURM_NTASKS`,
    `SLURM_PROCID`, `SLURM_LOCALID`), Open MPI (`OMPI_MCA_orte_hnp_uri`, `OMPI_COMM_WORLD_SIZE`,
    `OMPI_COMM_WORLD_RANK`, `OMPI_COMM_WORLD_LOCAL_RANK`), GKE TPU (`TPU_WORKER_HOSTNAMES` or
    `TPU_PROCESS_ADDRESSES`, `TPU_WORKER_ID`), or
  - `--distributed`: jax's own auto-detection, which also covers Cloud TPU pod slices (GCE metadata)
    and Kubernetes.
jax itself also reads `JAX_COORDINATOR_PORT`, `JAX_COORDINATOR_BIND_ADDRESS` and `JAX_LOCAL_DEVICE_IDS`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from epo_tui.errors import UserError

AUTO = "auto"  # jax.distributed.initialize() with no arguments: jax finds the cluster


@dataclass(frozen=True)
class Cluster:
    process_id: int = 0
    num_processes: int = 1

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0

    def share(self, features: Sequence[int]) -> list[int]:
        """This process's features: every num_processes-th, starting at its id."""
        return list(features[self.process_id::self.num_processes])

    def to_json(self) -> dict:
        return {"id": self.process_id, "count": self.num_processes}


def launch_spec(coordinator: str | None, num_processes: int | None, process_id: int | None,
                auto: bool = False, environ: Mapping[str, str] = os.environ) -> dict | str | None:
    """What to pass to jax.distributed.initialize: keyword arguments, AUTO, or None (one process)."""
    flags = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    given = [name for name, value in flags.items() if value is not None]
    if given:
        missing = [name for name in flags if name not in given]
        if missing:
            raise UserError(f"{', '.join(flags)} go together; missing {', '.join(missing)}")
        return _checked(coordinator, num_processes, process_id, "--")
    if "JAX_COORDINATOR_ADDRESS" in environ and ("JAX_NUM_PROCESSES" in environ or "JAX_PROCESS_ID" in environ):
        count = _env_int(environ, "JAX_NUM_PROCESSES")
        return _checked(environ["JAX_COORDINATOR_ADDRESS"], count, _env_int(environ, "JAX_PROCESS_ID"), "env")
    if auto or _cluster_manager_with_several_processes(environ):
        return AUTO
    return None


def _checked(coordinator: str, num_processes: int, process_id: int, origin: str) -> dict | None:
    names = ({"coordinator": "--coordinator", "count": "--num-processes", "id": "--process-id"} if origin == "--"
             else {"coordinator": "JAX_COORDINATOR_ADDRESS", "count": "JAX_NUM_PROCESSES", "id": "JAX_PROCESS_ID"})
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"{names['coordinator']}: expected HOST:PORT, found '{coordinator}'")
    if num_processes < 1:
        raise UserError(f"{names['count']}: must be >= 1, found {num_processes}")
    if not 0 <= process_id < num_processes:
        raise UserError(f"{names['id']}: must be in 0..{num_processes - 1}, found {process_id}")
    if num_processes == 1:
        return None
    return {"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id}


def _env_int(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name)
    if value is None or not value.strip().lstrip("-").isdigit():
        raise UserError(f"{name}: expected an integer, found {value!r} (set JAX_COORDINATOR_ADDRESS, "
                        "JAX_NUM_PROCESSES and JAX_PROCESS_ID together)")
    return int(value)


def _cluster_manager_with_several_processes(environ: Mapping[str, str]) -> bool:
    """Slurm, Open MPI or GKE TPU variables describing more than one process (as jax detects them)."""
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(name in environ for name in slurm) and environ["SLURM_NTASKS"].strip() not in ("", "1"):
        return True
    if "OMPI_MCA_orte_hnp_uri" in environ and environ.get("OMPI_COMM_WORLD_SIZE", "1").strip() not in ("", "1"):
        return True
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
    return "," in hosts


def connect(spec: dict | str | None) -> Cluster:
    """Starts jax.distributed (before any other jax use) when `spec` asks for it."""
    if spec is None:
        return Cluster()
    import jax

    # CPU processes exchange data through gloo (TPUs and GPUs use their own interconnect)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**({} if spec == AUTO else spec))
    except (RuntimeError, ValueError) as err:
        where = "the detected cluster" if spec == AUTO else spec["coordinator_address"]
        raise UserError(f"cannot start jax.distributed with {where}: {str(err).strip().splitlines()[0]}") from None
    return Cluster(process_id=jax.process_index(), num_processes=jax.process_count())


# ----------------------------------------------------------------------------------------------
# Gathering per-feature summaries: fixed-shape arrays, one row per feature, padded with feature -1

_INT_FIELDS = ("feature", "iterations_run", "interrupted", "process_id")
_FLOAT_FIELDS = ("act", "xent")


def gather_summaries(summaries: list[dict], cluster: Cluster, rows: int, prompt_tokens: int) -> list[dict]:
    """Every process's summaries (feature, act, xent, token_ids, iterations_run, interrupted,
    process_id), on every process. `rows` and `prompt_tokens` must be the same on all processes."""
    ints_RxI, floats_RxF = _pack(summaries, rows, prompt_tokens)
    if cluster.num_processes > 1:
        from jax.experimental import multihost_utils

        ints_RxI, floats_RxF = (np.asarray(a) for a in multihost_utils.process_allgather(
            (ints_RxI, floats_RxF), tiled=True))
    return _unpack(ints_RxI, floats_RxF)


def rows_per_process(n_features: int, cluster: Cluster) -> int:
    return max(1, math.ceil(n_features / cluster.num_processes))


def _pack(summaries: list[dict], rows: int, prompt_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    ints = np.full((rows, len(_INT_FIELDS) + prompt_tokens), -1, np.int32)
    floats = np.zeros((rows, len(_FLOAT_FIELDS)), np.float32)
    for r, entry in enumerate(summaries):
        ids = list(entry["token_ids"])[:prompt_tokens]
        ints[r, :len(_INT_FIELDS)] = [int(entry[name]) for name in _INT_FIELDS]
        ints[r, len(_INT_FIELDS):len(_INT_FIELDS) + len(ids)] = ids
        floats[r] = [entry[name] for name in _FLOAT_FIELDS]
    return ints, floats


def _unpack(ints_RxI: np.ndarray, floats_RxF: np.ndarray) -> list[dict]:
    out = []
    for ints, floats in zip(ints_RxI, floats_RxF):
        if ints[0] < 0:  # padding
            continue
        entry = {name: int(v) for name, v in zip(_INT_FIELDS, ints)}
        entry["interrupted"] = bool(entry["interrupted"])
        entry.update({name: float(v) for name, v in zip(_FLOAT_FIELDS, floats)})
        entry["token_ids"] = [int(t) for t in ints[len(_INT_FIELDS):] if t >= 0]
        out.append(entry)
    return out
