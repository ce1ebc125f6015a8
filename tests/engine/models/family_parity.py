"""What every model family's parity tests share: a tiny checkpoint loaded both ways (`Case`), the
tolerances, the reference values (transformers logits and module activations, TransformerLens's cache),
and the checks each family runs alike (bfloat16, one-hot input, early stop, a prefix computed once)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from epo_tui.config import ModelConfig
from epo_tui.engine.language_model import load_model
from epo_tui.engine.models.hooks import TL_ALIASES

SEQ_LEN = 12
ATOL = 1e-4
# our bfloat16 logits may be this many times further from float32 than transformers' own bfloat16
# forward: XLA's CPU rounds bfloat16 dots differently by instruction set (2.005x measured for the
# Qwen 3 case on an AVX2-only CPU, under 2x with AVX-512); a missing norm or scale is 10x and more
BF16_VS_TRANSFORMERS = 3.0


class Case:
    """One tiny checkpoint: its folder, our fp32 model, and the transformers model (eval, fp32)."""

    def __init__(self, folder, family: str):
        from transformers import AutoModelForCausalLM

        self.folder, self.family = folder, family
        self.model = load_model(ModelConfig(name=None, path=str(folder)))
        self.hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.n_layers = self.model.n_layers

    def ids(self, batch: int = 2) -> np.ndarray:
        return np.random.default_rng(batch).integers(0, self.model.vocab_size, (batch, SEQ_LEN)).astype(np.int32)

    def all_hooks(self) -> tuple[str, ...]:
        """Every TransformerLens point of every layer (a HookedTransformer has; not TL_ALIASES's newer names)."""
        points = [p for p in self.model.family.hook_names(self.model.cfg).tl_points if p not in TL_ALIASES]
        return tuple(f"blocks.{layer}.{point}" for layer in range(self.n_layers) for point in points)

    def hf_hooks(self) -> dict[str, tuple[int, str]]:
        """Every transformers module name of every layer -> (layer, module key)."""
        names = self.model.family.hook_names(self.model.cfg)
        return {f"{names.layer_prefixes[0]}.{layer}.{key}": (layer, key)
                for layer in range(self.n_layers) for key in names.modules}


def max_diff(ours, ref) -> float:
    ours, ref = np.asarray(ours, dtype=np.float32), np.asarray(ref, dtype=np.float32)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max())


def hf_logits(case: Case, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return case.hf(torch.from_numpy(ids).long()).logits.numpy()


def tl_value(cache, name: str) -> torch.Tensor:
    """A TransformerLens cache entry as sae-lens feeds it to an SAE: hook_z's heads concatenated."""
    value = cache[name]
    return value.flatten(-2) if name.endswith("attn.hook_z") else value


def hf_module_activations(hf_model, layers, hooks: dict[str, tuple[int, str]], ids: np.ndarray) -> dict:
    """What each named module returns (`.output`, its first element when a tuple) or receives as its first
    argument (`.input`) in a transformers forward, caught with PyTorch forward hooks."""
    caught: dict[str, torch.Tensor] = {}

    def output_of(name):
        return lambda _m, _args, out: caught.__setitem__(name, out[0] if isinstance(out, tuple) else out)

    def input_of(name):
        return lambda _m, args, kwargs: caught.__setitem__(name, args[0] if args else kwargs["hidden_states"])

    handles = []
    for name, (layer, key) in hooks.items():
        path, _, io = key.rpartition(".") if key not in ("input", "output") else ("", "", key)
        module = layers[layer].get_submodule(path)
        handles.append(module.register_forward_hook(output_of(name)) if io == "output"
                       else module.register_forward_pre_hook(input_of(name), with_kwargs=True))
    try:
        with torch.no_grad():
            hf_model(torch.from_numpy(ids).long())
    finally:
        for handle in handles:
            handle.remove()
    return caught


def check_bfloat16_close_to_float32(case: Case, top_token_agreement: float | None = 0.9) -> None:
    """Our bfloat16 logits against our float32 ones. bfloat16 keeps 8 significant bits (relative step 2**-8 = 0.4%); after a few roundings per layer
    the logits here move by ~3% of their largest magnitude, as transformers' own bfloat16 forward does
    (measured: ours 0.10-0.20, HF 0.13-0.16 on logits up to ~7). So: within 10% of the logit scale,
    and no further from float32 than BF16_VS_TRANSFORMERS times HF's bfloat16 error. A missing norm, scale or cap moves
    logits by their own size."""
    from transformers import AutoModelForCausalLM

    model16 = load_model(ModelConfig(name=None, path=str(case.folder), dtype="bfloat16"))
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(model16.params))
    ids = case.ids()
    logits16, _ = model16.forward(ids)
    logits32, _ = case.model.forward(ids)
    assert logits16.dtype == jnp.float32 and bool(jnp.isfinite(logits16).all())
    hf16 = AutoModelForCausalLM.from_pretrained(case.folder, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        hf_logits16 = hf16(torch.from_numpy(ids).long()).logits.float().numpy()
    error = max_diff(logits16, logits32)
    assert error < 0.1 * float(jnp.abs(logits32).max())
    assert error <= BF16_VS_TRANSFORMERS * max_diff(hf_logits16, logits32)
    if top_token_agreement is not None:  # near-ties may flip
        assert float((logits16.argmax(-1) == logits32.argmax(-1)).mean()) >= top_token_agreement


def check_without_logits_stops_early(case: Case, hook: str) -> None:
    """`logits=False` returns no logits and the same activation at `hook` as a full forward."""
    ids = case.ids()
    logits, acts = case.model.forward(ids, hooks=(hook,), logits=False)
    assert logits is None and set(acts) == {hook}
    _, full = case.model.forward(ids, hooks=(hook,))
    assert max_diff(acts[hook], full[hook]) < 1e-6


def check_one_hot_input_matches_ids(case: Case) -> None:
    """One-hot rows in (as the gradient pass feeds them) give the logits the token ids give."""
    ids = case.ids()
    from_ids, _ = case.model.forward(ids)
    from_onehot, _ = case.model.forward(jax.nn.one_hot(ids, case.model.vocab_size))
    assert max_diff(from_onehot, from_ids) < 1e-5


def check_prefix_computed_once(case: Case, hooks: tuple[str, ...], **forward_options) -> None:
    """A 7-token prefix's keys and values, computed once and reused for a batch of 3 continuations, give
    the logits and the activation at every hook that one pass over the whole sequence gives."""
    ids = case.ids(batch=3)
    prefix, rest = ids[0, :7].tolist(), ids[:, 7:]
    ids[:, :7] = prefix
    full_logits, full_acts = case.model.forward(ids, hooks=hooks, **forward_options)
    _, _, prefix_kv = case.model.prefill(prefix)
    logits, acts = case.model.forward(rest, hooks=hooks, prefix_kv=prefix_kv, **forward_options)
    assert max_diff(logits, full_logits[:, 7:]) < ATOL
    for hook in hooks:
        assert max_diff(acts[hook], full_acts[hook][:, 7:]) < ATOL, hook
