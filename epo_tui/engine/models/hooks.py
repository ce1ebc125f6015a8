"""Hook points, recorded during a forward pass, under two kinds of names.

- TransformerLens / sae-lens names, `blocks.L.<point>` (`blocks.8.hook_resid_pre`): the activation as
  TransformerLens computes it, with its centred writing weights where the SAE was trained on them.
- Transformers module names, as an SAE's `hf_hook_name` writes them (`model.layers.12.output`,
  `model.layers.12.self_attn.o_proj.input`): exactly what that module of the Hugging Face model
  returns (`.output`, the default) or receives as its first argument (`.input`). No TransformerLens
  processing applies to them.

Each family records its activations under the points below (`record(layer, point, value)`) and says,
in a `HookNames`, which TransformerLens points it has and which of its modules map to which point.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import jax.numpy as jnp

from epo_tui.errors import UserError, did_you_mean

# TransformerLens points inside block L, in the order a forward pass reaches them.
BLOCK_POINTS = (
    "hook_resid_pre",
    "ln1.hook_normalized",  # the attention's input normalised, before the norm's gain
    # every head's output before W_O, heads concatenated: BxLx(H*K). TransformerLens folds the value
    # biases into W_O's bias (from_pretrained's fold_value_biases), so its hook_z lacks b_V
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    "hook_mlp_in",  # what the MLP's norm reads (resid_mid; resid_pre in parallel blocks)
    "ln2.hook_normalized",
    "mlp.hook_in",  # the MLP's input after its norm, gain included (TransformerLens's newer name)
    "mlp.hook_pre",
    "mlp.hook_pre_linear",  # gated MLPs: the up projection
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)
# Points that live in the residual basis: TransformerLens centres them when it centres writing weights.
RESIDUAL_POINTS = frozenset({"hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_in",
                             "hook_mlp_out", "hook_resid_post"})
# Points only a transformers module name reaches (no TransformerLens name is the same activation).
ATTN_INPUT = "hf:attn_input"  # the attention's input with the norm's gain
ATTN_Z = "hf:attn_z"  # W_O's input: attn.hook_z with the value biases (BxLxHxK, concatenated when read)
ATTN_OUTPUT_RAW = "hf:attn_output_raw"  # the attention's output before a post-attention norm
MLP_INPUT = "hf:mlp_input"  # the MLP's input with the norm's gain
MLP_OUTPUT_RAW = "hf:mlp_output_raw"  # the MLP's output before a post-feedforward norm
# TransformerLens names of the same activation as a point above or below.
TL_ALIASES = {"mlp.hook_in": MLP_INPUT}
# Points not d_model wide: config attribute(s) whose product is the width.
POINT_WIDTHS = {"attn.hook_z": ("n_heads", "head_dim"), ATTN_Z: ("n_heads", "head_dim"), "mlp.hook_pre": ("d_mlp",),
                "mlp.hook_pre_linear": ("d_mlp",), "mlp.hook_post": ("d_mlp",)}

_TL_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF_SUFFIXES = (".input", ".output")


@dataclass(frozen=True)
class HookNames:
    """What one family can record: its TransformerLens points, where its decoder layers sit in a
    checkpoint (`model.layers`), and its modules (relative to a layer, with `.input`/`.output`;
    `output` is the layer's own) mapped to the point that holds the same activation."""

    tl_points: tuple[str, ...]
    layer_prefixes: tuple[str, ...]
    modules: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HookPoint:
    layer: int
    point: str  # what the family records
    name: str  # as asked for
    transformer_lens: bool  # TransformerLens's centring may apply

    @property
    def width_fields(self) -> tuple[str, ...]:
        """The config fields whose product is this point's width (d_model for most)."""
        return POINT_WIDTHS.get(self.point, ("d_model",))


def parse_hook(name: str, n_layers: int, names: HookNames) -> HookPoint:
    """A hook name (TransformerLens's `blocks.8.hook_resid_pre` or a transformers module's
    `model.layers.8.output`) -> the HookPoint the family records, or a UserError saying why not."""
    match = _TL_RE.match(name)
    if match:
        layer, point = int(match.group(1)), match.group(2)
        if point not in names.tl_points:
            raise UserError(f"unknown hook point '{point}' in '{name}'{did_you_mean(point, names.tl_points)}"
                            f" (this model has: {', '.join(names.tl_points)})")
        return HookPoint(_checked_layer(layer, name, n_layers), TL_ALIASES.get(point, point), name, True)
    for prefix in names.layer_prefixes:
        hf = re.match(rf"^{re.escape(prefix)}\.(\d+)(?:\.(.+))?$", name)
        if hf:
            layer, module = int(hf.group(1)), hf.group(2) or "output"
            key = module if module in ("input", "output") or module.endswith(_HF_SUFFIXES) else module + ".output"
            if key not in names.modules:
                raise UserError(f"hook '{name}': this model has no module '{module}' in its layers"
                                f"{did_you_mean(key, names.modules)} (supported: {', '.join(names.modules)})")
            return HookPoint(_checked_layer(layer, name, n_layers), names.modules[key], name, False)
    examples = [f"blocks.{min(1, n_layers - 1)}.hook_resid_post",
                *(f"{prefix}.{min(1, n_layers - 1)}.output" for prefix in names.layer_prefixes[:1])]
    raise UserError(f"unknown hook '{name}' (hooks look like {' or '.join(repr(e) for e in examples)}"
                    f" with L < {n_layers})")


def _checked_layer(layer: int, name: str, n_layers: int) -> int:
    if layer >= n_layers:
        raise UserError(f"hook '{name}' is not in the model: it has {n_layers} layers (0..{n_layers - 1})")
    return layer


class HookRecorder:
    """Collects the requested activations during one traced forward pass.

    `center_writes` reproduces TransformerLens's centred writing weights for LayerNorm models: every
    residual-basis activation asked for by its TransformerLens name loses its mean over d_model
    (LayerNorm is blind to that mean, so the rest of the forward pass is unchanged).
    """

    def __init__(self, hooks: tuple[str, ...], n_layers: int, names: HookNames, center_writes: bool = False,
                 keep_kv: bool = False):
        self.wanted: dict[tuple[int, str], list[HookPoint]] = {}
        for hook in hooks:
            point = parse_hook(hook, n_layers, names)
            self.wanted.setdefault((point.layer, point.point), []).append(point)
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
        return max((layer for layer, _ in self.wanted), default=-1)

    def record(self, layer: int, point: str, value_BxLxD: jnp.ndarray) -> None:
        for hook in self.wanted.get((layer, point), ()):
            value = value_BxLxD
            if point in ("attn.hook_z", ATTN_Z):  # BxLxHxK -> heads concatenated, as sae-lens reshapes hook_z
                value = value.reshape(*value.shape[:-2], -1)
            if self.center_writes and hook.transformer_lens and point in RESIDUAL_POINTS:
                value = value - value.mean(axis=-1, keepdims=True)
            self.out[hook.name] = value
