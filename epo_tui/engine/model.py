"""A loaded language model: family module, config, parameters, tokenizer, and its jitted forward."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from epo_tui.config import ModelConfig
from epo_tui.engine.checkpoint import read_safetensors, resolve_checkpoint_dir
from epo_tui.engine.models import family_module
from epo_tui.engine.models.hooks import HookRecorder, parse_hook
from epo_tui.engine.token_bytes import TokenBytes
from epo_tui.errors import UserError, first_line
from epo_tui.text import token_text

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def apply_model(params: dict, tokens_or_onehot: jnp.ndarray, prefix_kv=None, *, model_type: str, cfg: Any,
                hooks: tuple[str, ...], logits: bool, center_writes: bool, keep_kv: bool = False):
    """(logits_BxLxV or None, {hook: activations}, kv) for ids BxL or one-hot BxLxV (pure; jit it).

    `prefix_kv` continues after a fixed prefix; `keep_kv` returns this pass's per-layer (k, v) so it
    can serve as the prefix of later passes (else kv is None).
    """
    family = family_module(model_type)
    recorder = HookRecorder(hooks, cfg.n_layers, center_writes, keep_kv=keep_kv)
    x_BxLxD = family.embed(params, cfg, tokens_or_onehot)
    logits_out = family.forward(params, cfg, x_BxLxD, recorder, logits, prefix_kv)
    return logits_out, recorder.out, (tuple(recorder.kv) if keep_kv else None)


run_model = jax.jit(apply_model, static_argnames=("model_type", "cfg", "hooks", "logits", "center_writes",
                                                  "keep_kv"))


@dataclass
class LanguageModel:
    name: str  # hub id or folder, for display
    model_type: str  # Hugging Face model_type: gpt2, gemma, gemma2
    cfg: Any  # the family's frozen Config
    params: dict
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    dtype: str

    @property
    def family(self) -> ModuleType:
        return family_module(self.model_type)

    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    @property
    def d_model(self) -> int:
        return self.cfg.d_model

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def forward(self, tokens_or_onehot, hooks: tuple[str, ...] = (), logits: bool = True,
                center_writes: bool = False, prefix_kv=None):
        """(logits_BxLxV | None, {hook: BxLx...}); hooks use sae-lens names (blocks.L.hook_resid_pre).

        With `prefix_kv` (from `prefill`), the tokens continue after that prefix.
        """
        for hook in hooks:
            parse_hook(hook, self.n_layers)  # a clear error before tracing
        logits_out, acts, _ = run_model(self.params, jnp.asarray(tokens_or_onehot), prefix_kv,
                                        model_type=self.model_type, cfg=self.cfg, hooks=tuple(hooks),
                                        logits=logits, center_writes=center_writes)
        return logits_out, acts

    def prefill(self, token_ids, hooks: tuple[str, ...] = (), center_writes: bool = False):
        """(logits_1xPxV, {hook: 1xPx...}, prefix_kv) for a fixed prefix, computed once."""
        return run_model(self.params, jnp.asarray([token_ids], dtype=jnp.int32), None,
                         model_type=self.model_type, cfg=self.cfg, hooks=tuple(hooks), logits=True,
                         center_writes=center_writes, keep_kv=True)

    def folded_unembedding_VxD(self) -> jnp.ndarray:
        """The unembedding with the final norm's gain folded in: what a residual direction reads as."""
        return self.family.folded_unembedding_VxD(self.params)

    def special_token_ids(self) -> np.ndarray:
        """Ids never to be proposed: BOS/EOS/pad/unk and every added special token."""
        ids = set(self.tokenizer.all_special_ids)
        ids.update(i for i, tok in self.tokenizer.added_tokens_decoder.items() if tok.special)
        return np.array(sorted(i for i in ids if i is not None and i < self.vocab_size), dtype=np.int32)

    def encode(self, text: str, prefix: str = "") -> list[int]:
        """BOS, then the prefix, then the text: each tokenized on its own, as the search lays them out."""
        bos = self.tokenizer.bos_token_id
        if bos is None:
            raise UserError(f"the tokenizer of '{self.name}' has no BOS token")
        ids = [bos]
        for part in (prefix, text):
            if part:
                ids += self.tokenizer(part, add_special_tokens=False)["input_ids"]
        return ids

    def decode(self, ids) -> str:
        """The text of token ids exactly as tokenized (no clean-up of spaces before punctuation)."""
        return self.tokenizer.decode([int(i) for i in ids], clean_up_tokenization_spaces=False)

    @functools.cached_property
    def _token_bytes(self) -> TokenBytes:
        return TokenBytes(self.tokenizer)

    def token_bytes(self, ids) -> list[bytes]:
        """Each id's raw bytes (engine/token_bytes.py): a token that is part of a UTF-8 character
        holds just those bytes, so a prompt's tokens joined are the UTF-8 of its text."""
        return self._token_bytes(ids)

    def token_strings(self, ids) -> list[str]:
        """Each id as a reader sees it alone (spaces kept): its text, with each byte that is not part of
        a complete UTF-8 character shown as `\\xNN` (`text.token_text`), never U+FFFD."""
        return [token_text(raw) for raw in self.token_bytes(ids)]


def load_model(model_cfg: ModelConfig) -> LanguageModel:
    from transformers import AutoConfig, AutoTokenizer

    folder = resolve_checkpoint_dir(model_cfg.name, model_cfg.path)
    try:
        hf_config = AutoConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the config or tokenizer in '{folder}': {first_line(err)}") from None
    family = family_module(hf_config.model_type)
    cfg = family.Config.from_hf(hf_config)
    dtype = DTYPES[model_cfg.dtype]
    params = family.params_from_checkpoint(read_safetensors(folder), cfg, cfg.n_layers)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype=dtype), params)
    return LanguageModel(name=model_cfg.path or model_cfg.name, model_type=hf_config.model_type,
                         cfg=cfg, params=params, tokenizer=tokenizer, dtype=model_cfg.dtype)
