"""What the search maximizes: one or more features read off a forward pass, combined into one number.

The static part (`Target`: kind, combine, read, hook) is hashable and goes to jit as a static
argument; the feature indices and vectors are arrays (`TargetArrays`), so changing the feature
reuses the compiled steps.

Shapes: B batch, L positions, D hook width, F features, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from epo_tui.config import FeatureConfig
from epo_tui.engine.pairing import ModelWithSAE
from epo_tui.engine.sae import SAEParams, check_feature_index, feature_pre_and_act
from epo_tui.errors import ConfigError, UserError

LP_FLOOR = 1e-6  # keeps x**p differentiable where relu(a + offset) is 0


@dataclass(frozen=True)
class Target:
    kind: str  # sae | direction | neuron | logit | vector
    combine: str  # lp | min | sum | contrast
    lp_p: float
    lp_offset: float
    read: str  # last | max
    hook: str  # the hook whose activations it reads (unused for logit)
    n_features: int


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class TargetArrays:
    indices_F: jax.Array  # int32
    vectors_FxD: jax.Array  # unit decoder rows (direction) or the user's vectors (vector); else 1x1
    # each feature's optimized value is divided by its scale before features combine (float32; ones:
    # raw units). Several SAE latents get theirs from engine/penalty_scale.py, so none outweighs another.
    scales_F: jax.Array


def build_target(pair: ModelWithSAE, feature: FeatureConfig, source: str = "config") -> tuple[Target, TargetArrays]:
    """The target the config describes, checked against the model and SAE."""
    model, sae = pair.model, pair.sae
    indices = feature.features
    if feature.kind == "direction" and sae.kind != "sae":
        # its decoder rows live where it writes (hook_name_out), not in the hook its latents read
        writes_to = sae.write_hook
        raise ConfigError(source, "feature.kind", f"'direction' reads the SAE's hook along a decoder row, but this "
                          f"SAE is a {sae.kind}, whose decoder writes to {writes_to}; use kind 'sae' (its latents), "
                          "or 'neuron', 'logit' or 'vector'")
    hook = sae.read_hook if feature.kind in ("sae", "direction") else feature.hook
    if feature.kind != "logit":
        model.hook_point(hook)
    limit = {"sae": sae.d_sae, "direction": sae.d_sae, "neuron": model.cfg.d_mlp,
             "logit": model.vocab_size, "vector": None}[feature.kind]
    for index in indices:
        if feature.kind in ("sae", "direction"):
            check_feature_index(sae, index, source)
        elif limit is not None and not 0 <= index < limit:
            raise UserError(f"feature.index: {index} is out of range for a {feature.kind} target (0..{limit - 1})")
    vectors = np.zeros((1, 1), np.float32)
    if feature.kind == "direction":
        rows = np.asarray(sae.W_dec_SxD)[list(indices)]
        vectors = rows / np.linalg.norm(rows, axis=-1, keepdims=True)
    elif feature.kind == "vector":
        vectors = _load_vector(feature.vector, model.hook_width(hook))
        indices = tuple(range(len(vectors)))
    target = Target(kind=feature.kind, combine=feature.combine, lp_p=feature.lp_p, lp_offset=feature.lp_offset,
                    read=feature.read, hook=hook, n_features=len(indices))
    return target, TargetArrays(indices_F=jnp.asarray(indices, jnp.int32), vectors_FxD=jnp.asarray(vectors),
                                scales_F=jnp.ones(len(indices), jnp.float32))


def _load_vector(path: str, width: int) -> np.ndarray:
    """A .npy of shape (D,) or (F, D); read with pickles disabled."""
    try:
        array = np.load(Path(path), allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UserError(f"feature.vector: cannot read '{path}' as a .npy array: {err}") from None
    array = np.atleast_2d(np.asarray(array, np.float32))
    if array.ndim != 2 or array.shape[1] != width:
        raise UserError(f"feature.vector: '{path}' has shape {array.shape}; expected ({width},) or (F, {width})")
    return array


def per_position(target: Target, arrays: TargetArrays, sae: SAEParams, hook_BxLxD: jax.Array | None,
                 logits_BxLxV: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(optimized_BxLxF, reported_BxLxF): for `sae`, the pre-activation and the true activation;
    for the other kinds both are the same value. The optimized values are divided by `arrays.scales_F`."""
    if target.kind == "sae":
        pre, act = feature_pre_and_act(sae, hook_BxLxD, arrays.indices_F)
        return pre / arrays.scales_F.astype(pre.dtype), act
    if target.kind == "logit":
        values = jnp.take(logits_BxLxV, arrays.indices_F, axis=-1)
    elif target.kind == "neuron":
        values = jnp.take(hook_BxLxD, arrays.indices_F, axis=-1).astype(jnp.float32)
    else:  # direction, vector
        values = jnp.einsum("BLD,FD->BLF", hook_BxLxD.astype(jnp.float32), arrays.vectors_FxD)
    return values / arrays.scales_F.astype(values.dtype), values


def combine(target: Target, values_BxLxF: jax.Array) -> jax.Array:
    """One number per position from F features (a single feature is itself).

    lp: the power mean with the seed's p of relu(a + offset), minus the offset (the seed's L_p norm
    scaled by F^(-1/p), so equal activations a give a); min; sum; contrast: the first feature minus
    the positive part of the others (raise one while holding the rest down).
    """
    if target.n_features == 1:
        return values_BxLxF[..., 0]
    if target.combine == "lp":
        shifted = jnp.maximum(jax.nn.relu(values_BxLxF + target.lp_offset), LP_FLOOR)
        return jnp.mean(shifted**target.lp_p, axis=-1) ** (1.0 / target.lp_p) - target.lp_offset
    if target.combine == "min":
        return values_BxLxF.min(axis=-1)
    if target.combine == "sum":
        return values_BxLxF.sum(axis=-1)
    return values_BxLxF[..., 0] - jax.nn.relu(values_BxLxF[..., 1:]).sum(axis=-1)  # contrast


def read(target: Target, values_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(value_B, position_B) at the read position: the last token, or where the value is largest."""
    if target.read == "last":
        return values_BxL[:, -1], jnp.full(values_BxL.shape[:1], values_BxL.shape[1] - 1)
    position = jnp.argmax(values_BxL, axis=-1)
    return jnp.take_along_axis(values_BxL, position[:, None], axis=-1)[:, 0], position
