"""Hook points named as in sae-lens / TransformerLens, recorded during a forward pass."""

from __future__ import annotations

import re
from dataclasses import dataclass

import jax.numpy as jnp

from epo_tui.errors import UserError, did_you_mean

# Points inside block L, in the order a forward pass reaches them.
BLOCK_POINTS = (
    "hook_resid_pre",
    "hook_attn_out",
    "hook_resid_mid",
    "mlp.hook_pre",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)
# Points that live in the residual basis: TransformerLens centres them when it centres writing weights.
RESIDUAL_POINTS = frozenset({"hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out",
                             "hook_resid_post"})
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class HookPoint:
    layer: int
    point: str

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.{self.point}"


def parse_hook(name: str, n_layers: int) -> HookPoint:
    """`blocks.8.hook_resid_pre` -> HookPoint(8, 'hook_resid_pre'), or a UserError saying why not."""
    match = _HOOK_RE.match(name)
    examples = [f"blocks.{min(1, n_layers - 1)}.{p}" for p in BLOCK_POINTS]
    if not match:
        raise UserError(f"unknown hook '{name}'{did_you_mean(name, examples)} (hooks look like "
                        f"'blocks.L.hook_resid_pre' with L < {n_layers})")
    layer, point = int(match.group(1)), match.group(2)
    if point not in BLOCK_POINTS:
        raise UserError(f"unknown hook point '{point}' in '{name}'{did_you_mean(point, BLOCK_POINTS)}"
                        f" (supported: {', '.join(BLOCK_POINTS)})")
    if layer >= n_layers:
        raise UserError(f"hook '{name}' is not in the model: it has {n_layers} layers (0..{n_layers - 1})")
    return HookPoint(layer, point)


class HookRecorder:
    """Collects the requested activations during one traced forward pass.

    `center_writes` reproduces TransformerLens's centred writing weights for LayerNorm models: every
    residual-basis activation loses its mean over d_model (LayerNorm is blind to that mean, so the rest
    of the forward pass is unchanged).
    """

    def __init__(self, hooks: tuple[str, ...], n_layers: int, center_writes: bool = False,
                 keep_kv: bool = False):
        self.points = {parse_hook(h, n_layers): h for h in hooks}
        self.center_writes = center_writes
        self.out: dict[str, jnp.ndarray] = {}
        # keys/values per layer, kept when this pass computes a fixed prefix for later passes
        self.kv: list[tuple[jnp.ndarray, jnp.ndarray]] | None = [] if keep_kv else None

    def keep_kv(self, k: jnp.ndarray, v: jnp.ndarray) -> None:
        if self.kv is not None:
            self.kv.append((k, v))

    @property
    def last_layer(self) -> int:
        """The deepest layer any requested hook needs (-1 when none is requested)."""
        return max((p.layer for p in self.points), default=-1)

    def record(self, layer: int, point: str, value_BxLxD: jnp.ndarray) -> None:
        name = self.points.get(HookPoint(layer, point))
        if name is None:
            return
        if self.center_writes and point in RESIDUAL_POINTS:
            value_BxLxD = value_BxLxD - value_BxLxD.mean(axis=-1, keepdims=True)
        self.out[name] = value_BxLxD


# ----------------------------------------------------------------------------------------------
# A fixed prefix's keys and values, computed once and attended to by every later pass.


def prefix_length(prefix_kv) -> int:
    """P, the number of prefix positions in per-layer (k, v) pairs shaped 1xPx...; 0 for none."""
    return 0 if prefix_kv is None else prefix_kv[0][0].shape[1]


def with_past(past_kv, k_BxLxNxK: jnp.ndarray, v_BxLxNxK: jnp.ndarray):
    """(k, v) over prefix + new positions: the prefix's (1xPxNxK) broadcast over the batch."""
    if past_kv is None:
        return k_BxLxNxK, v_BxLxNxK
    B = k_BxLxNxK.shape[0]
    past_k, past_v = (jnp.broadcast_to(t, (B,) + t.shape[1:]).astype(k_BxLxNxK.dtype) for t in past_kv)
    return jnp.concatenate([past_k, k_BxLxNxK], axis=1), jnp.concatenate([past_v, v_BxLxNxK], axis=1)


def causal_mask(L: int, S: int, window: int | None = None) -> jnp.ndarray:
    """allowed_LxS for L new queries after S - L prefix positions (absolute query position S - L + l);
    with `window`, keys further back than window - 1 positions are masked too (sliding attention)."""
    q_L = jnp.arange(S - L, S)[:, None]
    k_S = jnp.arange(S)[None, :]
    allowed = k_S <= q_L
    if window is not None:
        allowed &= k_S > q_L - window
    return allowed
