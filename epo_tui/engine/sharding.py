"""Where the weights live: a ("data", "model") mesh of this host's devices, each parameter's share of
it, and whether a model fits the devices' memory at all.

Candidates are split along "data" (each data row runs its own children); weights are split along
"model" (Megatron style: attention heads and the MLP's hidden units, so each device holds 1/M of every
layer and jit's automatic partitioning adds the all-reduce after W_O and W_down). Which axis of a
parameter is split comes from its name alone: every family names its leaves with their shape letters
as a suffix (`w_q_HxKxD`, `w_down_DxF`, `embed_VxD`, the SAE's `W_enc_DxS`), so a new family needs
nothing here (`partition_spec`).

Shapes: M the model axis size (`[model] model_parallel`), N the data axis size (devices / M).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from epo_tui.errors import ConfigError, UserError

DATA, MODEL = "data", "model"
AUTO = "auto"
# Suffix letters split along "model", first match wins (one mesh axis can split one array axis):
# E experts, H query heads, G key-value heads, F MLP width, V vocabulary, S SAE latents. Every other
# letter (D d_model, K head dim, P positions, digits) stays whole. An axis whose size M does not divide
# stays whole too (e.g. 1 key-value head, GPT-2's 50257 tokens): correct, just not split.
SPLIT_LETTERS = "EHGFVS"
# model_parallel must divide these (else a ConfigError): they hold nearly all the weights.
REQUIRED_LETTERS = {"H": "attention heads", "F": "MLP width"}
# Weights (and the SAE) may take this share of a device's memory; the rest is for activations. XLA's
# buffer assignment (CPU, float32) at Gemma 3 27B's widths and the default search sizes, split 4 ways:
# the evaluation's temporaries 0.7 GB per device (an EVAL_CHUNK of BxNxV logits), the gradient pass's
# 0.07 GB per layer per device.
WEIGHT_SHARE = 0.8


def shape_letters(name: str, ndim: int) -> tuple[str, ...] | None:
    """The letters of a leaf name's shape suffix (`w_q_HxKxD` -> ('H', 'K', 'D')), one per axis, or None
    when the name has no suffix of `ndim` axes (`ln1_g`, `b_qkv`): such a leaf is never split."""
    letters = tuple(name.rsplit("_", 1)[-1].split("x")) if "_" in name else ()
    if len(letters) != ndim or not all(len(a) == 1 and a.isupper() or a.isdigit() for a in letters):
        return None
    return letters


def partition_spec(name: str, shape: Sequence[int], model_size: int) -> PartitionSpec:
    """The leaf's PartitionSpec on a ("data", "model") mesh: the first axis whose letter is in
    SPLIT_LETTERS and whose size `model_size` divides is split along "model"; the rest, and every
    axis along "data", are replicated."""
    letters = shape_letters(name, len(shape))
    if model_size == 1 or letters is None:
        return PartitionSpec()
    for letter in SPLIT_LETTERS:
        for axis, (have, size) in enumerate(zip(letters, shape)):
            if have == letter and size % model_size == 0:
                return PartitionSpec(*([None] * axis), MODEL)
    return PartitionSpec()


def _leaf_name(path) -> str:
    last = path[-1] if path else None
    return str(getattr(last, "key", getattr(last, "name", "")))


def leaf_specs(tree: Any, model_size: int) -> Any:
    """`tree` with each array leaf replaced by its PartitionSpec (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: partition_spec(_leaf_name(path), leaf.shape, model_size), tree)


def shardings(tree: Any, mesh: Mesh) -> Any:
    """`tree` with each leaf replaced by its NamedSharding on `mesh` (for jax.device_put)."""
    specs = leaf_specs(tree, mesh.shape[MODEL])
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def place(tree: Any, mesh: Mesh) -> Any:
    """`tree`'s arrays on `mesh`, each split as `partition_spec` says (a no-op where already there)."""
    return jax.device_put(tree, shardings(tree, mesh))


def on_host():
    """A context in which new arrays go to host memory (jax's CPU device) where the CPU backend is on,
    so a checkpoint is read whole only there; elsewhere (JAX_PLATFORMS without cpu) it changes nothing."""
    try:
        return jax.default_device(jax.local_devices(backend="cpu")[0])
    except RuntimeError:
        return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# The mesh


def make_mesh(model_parallel: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A (devices / model_parallel) x model_parallel mesh named ("data", "model") of `devices`
    (default: this process's), laid out by jax so each model row sits on nearby chips."""
    devices = list(jax.local_devices() if devices is None else devices)
    if len(devices) % model_parallel:
        raise UserError(f"model_parallel = {model_parallel} does not divide the {len(devices)} devices")
    shape = (len(devices) // model_parallel, model_parallel)
    try:
        return jax.make_mesh(shape, (DATA, MODEL), axis_types=(AxisType.Auto,) * 2, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):  # a device set jax cannot lay out: in order
        return Mesh(np.array(devices).reshape(shape), (DATA, MODEL), axis_types=(AxisType.Auto,) * 2)


def data_size(mesh: Mesh) -> int:
    """How many candidate shards the mesh runs side by side (a 1-D mesh: all of it)."""
    return mesh.shape.get(DATA, mesh.size)


# ----------------------------------------------------------------------------------------------
# Memory: how much each device holds, and how many devices a model needs


@dataclass(frozen=True)
class Weights:
    """A model's weights as the mesh splits them: bytes split along "model" (divided by M on each
    device) and bytes every device holds whole."""

    split: int
    whole: int

    @property
    def total(self) -> int:
        return self.split + self.whole

    def per_device(self, model_size: int) -> int:
        return self.whole + math.ceil(self.split / model_size)


def weights_of(tree: Any, model_size: int) -> Weights:
    """The bytes of `tree`'s leaves (arrays or ShapeDtypeStructs) as split on a model axis of `model_size`."""
    split = whole = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        if partition_spec(_leaf_name(path), leaf.shape, model_size) == PartitionSpec():
            whole += nbytes
        else:
            split += nbytes
    return Weights(split=split, whole=whole)


def letter_sizes(tree: Any) -> dict[str, int]:
    """The size of each shape letter found in `tree`'s leaf names ({'H': 8, 'F': 64, ...})."""
    sizes: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        letters = shape_letters(_leaf_name(path), len(leaf.shape)) or ()
        for letter, size in zip(letters, leaf.shape):
            sizes.setdefault(letter, size)
    return sizes


def device_memory(devices: Sequence[Any] | None = None) -> int | None:
    """The smallest memory (bytes) jax lets one of `devices` use (`memory_stats()["bytes_limit"]`), or
    None where the backend does not say (CPU)."""
    limits = []
    for device in jax.local_devices() if devices is None else devices:
        try:
            stats = device.memory_stats()
        except Exception:  # backends without memory statistics raise rather than return None
            stats = None
        if not stats or not stats.get("bytes_limit"):
            return None
        limits.append(int(stats["bytes_limit"]))
    return min(limits) if limits else None


def size_text(n: float) -> str:
    """Bytes as a reader counts them: '54.9 GB', '16 GB', '150.3 kB' (powers of 1000, one decimal)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{int(n)} B"


def valid_model_sizes(sizes: dict[str, int], upto: int | None = None) -> list[int]:
    """Model axis sizes (up to `upto`) that divide every REQUIRED_LETTERS size the model has, ascending."""
    common = math.gcd(*(sizes[a] for a in REQUIRED_LETTERS if a in sizes)) or 1
    return [m for m in range(1, common + 1) if common % m == 0 and (upto is None or m <= upto)]


def choose_model_parallel(tree: Any, setting: int | str, *, what: str, n_devices: int, memory: int | None,
                          source: str = "config") -> int:
    """The model axis size for `tree` (what goes on the mesh: the model's parameters and its SAE, as arrays
    or ShapeDtypeStructs) on this host's `n_devices` devices of `memory` bytes each (None: unknown, as
    on CPU). `what` names it in errors ("google/gemma-3-27b-pt in bfloat16").

    `setting` is `[model] model_parallel`: a number, checked (it must divide the devices, the heads and
    the MLP width), or "auto": the smallest size that fits, 1 where the memory is unknown.
    Raises ConfigError for a setting that cannot be, and UserError (one line: how many devices of what
    memory it needs) when it does not fit.
    """
    sizes = letter_sizes(tree)
    key = "model.model_parallel"
    if setting != AUTO:
        m = int(setting)
        if n_devices % m:
            divisors = ", ".join(str(d) for d in range(1, n_devices + 1) if n_devices % d == 0)
            raise ConfigError(source, key, f"{m} does not divide this host's {n_devices} device"
                              f"{'s' if n_devices > 1 else ''} (choose {divisors} or \"auto\")")
        for letter, name in REQUIRED_LETTERS.items():
            if letter in sizes and sizes[letter] % m:
                raise ConfigError(source, key, f"{m} does not divide the model's {sizes[letter]} {name}")
        if fits(tree, m, memory):
            return m
        raise UserError(needs_message(tree, what, n_devices, memory, sizes, tried=m))
    if memory is None:
        return 1
    for m in valid_model_sizes(sizes, n_devices):
        if n_devices % m == 0 and fits(tree, m, memory):
            return m
    raise UserError(needs_message(tree, what, n_devices, memory, sizes))


def fits(tree: Any, model_size: int, memory: int | None) -> bool:
    """Whether each device's share of `tree` at this model axis size is within WEIGHT_SHARE of `memory`
    (always, where the memory is unknown)."""
    return memory is None or weights_of(tree, model_size).per_device(model_size) <= WEIGHT_SHARE * memory


def devices_needed(tree: Any, memory: int, sizes: dict[str, int] | None = None) -> int | None:
    """The smallest model axis size at which `tree` fits devices of `memory` bytes (any device count);
    None when none does, not even one head per device."""
    sizes = letter_sizes(tree) if sizes is None else sizes
    return next((m for m in valid_model_sizes(sizes) if fits(tree, m, memory)), None)


def needs_message(tree: Any, what: str, n_devices: int, memory: int, sizes: dict[str, int] | None = None,
                  tried: int | None = None) -> str:
    """One line: 'gemma-3-27b in bfloat16 needs 54.9 GB: at least 8 devices of 16 GB with [model]
    model_parallel = 8 (this host has 1 of 16 GB)'."""
    sizes = letter_sizes(tree) if sizes is None else sizes
    have = f"this host has {n_devices} of {size_text(memory)}"
    if tried is not None:
        have = f"model_parallel = {tried} puts {size_text(weights_of(tree, tried).per_device(tried))} on each; {have}"
    head = f"{what} needs {size_text(weights_of(tree, 1).total)}"
    need = devices_needed(tree, memory, sizes)
    if need is None:
        fix = 'model.dtype = "bfloat16" or bigger devices' if " float32" in what else "bigger devices"
        return f"{head}: it fits devices of {size_text(memory)} at no [model] model_parallel ({have}); use {fix}"
    return f"{head}: at least {need} devices of {size_text(memory)} with [model] model_parallel = {need} ({have})"
