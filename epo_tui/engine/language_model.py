"""A loaded language model: family module, config, parameters, tokenizer, and its jitted forward."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from epo_tui.config import ModelConfig
from epo_tui.engine import sharding
from epo_tui.engine.hf_checkpoint import CheckpointTensors, read_safetensors, resolve_checkpoint_dir
from epo_tui.engine.export_cache import ExportedJit
from epo_tui.engine.models import family_module
from epo_tui.engine.models.hooks import ATTN_Z, HookPoint, HookRecorder, parse_hook
from epo_tui.engine.token_bytes import TokenBytes
from epo_tui.errors import UserError, first_line, require_utf8
from epo_tui.text import token_text

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# platforms where "auto" picks bfloat16: their matmul units take it at full rate with float32
# accumulation. CPUs stay float32: XLA's CPU bfloat16 dot measured slower than float32 (README).
BFLOAT16_PLATFORMS = frozenset({"gpu", "cuda", "rocm", "tpu"})
# hook points whose activations reach the residual through one linear map: that weight's name prefix
WRITE_WEIGHTS = {"attn.hook_z": ("w_o_",), ATTN_Z: ("w_o_",), "mlp.hook_post": ("w_down_", "w_out_")}
D_MLP_POINTS = frozenset({"mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post"})
CHAT_PREFIX = "chat"  # search.prefix that asks for the chat template's user turn


def apply_model(params: dict, tokens_or_onehot: jnp.ndarray, prefix_kv=None, *, model_type: str, cfg: Any,
                hooks: tuple[str, ...], logits: bool, center_writes: bool, keep_kv: bool = False,
                logit_positions: int | None = None):
    """(logits_BxLxV or None, {hook: activations}, kv) for ids BxL or one-hot BxLxV (pure; jit it).

    `prefix_kv` continues after a fixed prefix (per layer (k, v), 1xPx.. or BxPx..); `keep_kv` returns
    this pass's per-layer (k, v) so it can serve as the prefix of later passes (else kv is None).
    `logit_positions` limits the logits to the first that many positions (the unembedding is a third of
    a small model's FLOPs; a search never needs the last position's prediction).
    """
    family = family_module(model_type)
    recorder = HookRecorder(hooks, cfg.n_layers, family.hook_names(cfg), center_writes, keep_kv=keep_kv)
    x_BxLxD = family.embed(params, cfg, tokens_or_onehot)
    residual_BxLxD = family.forward(params, cfg, x_BxLxD, recorder, logits, prefix_kv)
    logits_out = None
    if logits:
        logits_out = family.head(params, cfg, residual_BxLxD[:, :logit_positions])
    return logits_out, recorder.out, (tuple(recorder.kv) if keep_kv else None)


run_model = ExportedJit(apply_model, "run_model", static_argnames=("model_type", "cfg", "hooks", "logits",
                                                                   "center_writes", "keep_kv", "logit_positions"))


@dataclass
class LanguageModel:
    name: str  # hub id or folder, for display
    model_type: str  # Hugging Face model_type: gpt2, gemma, gemma2
    cfg: Any  # the family's frozen Config
    params: dict
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    dtype: str  # of params as loaded: "float32" or "bfloat16" (model.dtype "auto" resolved)
    # the ("data", "model") mesh `params` are placed on (engine/sharding.py); None: wherever they are
    mesh: Mesh | None = None

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
        """(logits_BxLxV | None, {hook: BxLx...}); hooks use TransformerLens names
        (blocks.L.hook_resid_pre) or transformers module names (model.layers.L.output): models/hooks.py.

        With `prefix_kv` (from `prefill`), the tokens continue after that prefix.
        """
        for hook in hooks:
            self.hook_point(hook)  # a clear error before tracing
        logits_out, acts, _ = run_model(self.params, jnp.asarray(tokens_or_onehot), prefix_kv,
                                        model_type=self.model_type, cfg=self.cfg, hooks=tuple(hooks),
                                        logits=logits, center_writes=center_writes)
        return logits_out, acts

    def prefill(self, token_ids, hooks: tuple[str, ...] = (), center_writes: bool = False):
        """(logits_1xPxV, {hook: 1xPx...}, prefix_kv) for a fixed prefix, computed once."""
        return run_model(self.params, jnp.asarray([token_ids], dtype=jnp.int32), None,
                         model_type=self.model_type, cfg=self.cfg, hooks=tuple(hooks), logits=True,
                         center_writes=center_writes, keep_kv=True)

    def hook_point(self, name: str) -> HookPoint:
        """Where the hook `name` sits in this model; UserError when it has no such hook."""
        return parse_hook(name, self.n_layers, self.family.hook_names(self.cfg))

    def hook_width(self, name: str) -> int:
        """How wide the hook's activations are (d_model, d_mlp, or n_heads * head_dim for attn.hook_z)."""
        return math.prod(getattr(self.cfg, f) for f in self.hook_point(name).width_fields)

    def residual_rows(self, hook: str, rows_xW: jnp.ndarray) -> jnp.ndarray | None:
        """Directions at `hook` (rows ...xW) as the residual-stream directions they write (...xD): as they are
        at a residual-basis hook, through the layer's W_O at attn.hook_z (heads concatenated) and through
        its down projection at mlp.hook_post; None where no linear map leads to the residual (mlp.hook_pre).

        The weights are found by the families' parameter names, whose suffix gives their axes
        (`w_o_DxHxK`, `w_o_HxKxD`, `w_down_DxF`, `w_out_FxD`).
        """
        point = self.hook_point(hook)
        prefixes = WRITE_WEIGHTS.get(point.point, ())
        if not prefixes:
            return rows_xW if point.point not in D_MLP_POINTS else None
        block = self.params["blocks"][point.layer]
        name = next((k for k in block if k.startswith(prefixes)), None)
        if name is None:  # e.g. a mixture of experts has no single down projection
            return None
        w = block[name]
        w_WxD = w.reshape(w.shape[0], -1).T if name.rsplit("_", 1)[1].startswith("Dx") else w.reshape(-1, self.d_model)
        return rows_xW.astype(jnp.float32) @ w_WxD.astype(jnp.float32)

    def folded_unembedding_VxD(self) -> jnp.ndarray:
        """The unembedding with the final norm's gain folded in: what a residual direction reads as."""
        return self.family.folded_unembedding_VxD(self.params)

    def special_token_ids(self) -> np.ndarray:
        """Ids never to be proposed, and never counted in a maximum or a statistic: BOS/EOS/pad/unk
        and every added special token (sorted, int32)."""
        return self._special_ids

    @functools.cached_property
    def _special_ids(self) -> np.ndarray:
        ids = set(self.tokenizer.all_special_ids)
        ids.update(i for i, tok in self.tokenizer.added_tokens_decoder.items() if tok.special)
        return np.array(sorted(i for i in ids if i is not None and i < self.vocab_size), dtype=np.int32)

    def encode(self, text: str, prefix: str = "") -> list[int]:
        """BOS, then the prefix, then the text: each tokenized on its own, as the search lays them out.

        The prefix may hold special tokens (a chat template's); the text may not (`prompt_ids`).
        `prefix = "chat"` is the user turn of the tokenizer's chat template (`chat_prefix`).
        """
        ids = [self.bos_id]
        if prefix == CHAT_PREFIX:
            prefix = self.chat_prefix()
        if prefix:
            require_utf8(prefix, "search.prefix")
            ids += self.tokenizer(prefix, add_special_tokens=False)["input_ids"]
        if text:
            ids += self.prompt_ids(text)
        return ids

    @property
    def bos_id(self) -> int:
        """The id every sequence starts with: BOS, or where the tokenizer has none (Qwen), EOS, as
        TransformerLens prepends it. Raises UserError when it has neither."""
        bos = self.tokenizer.bos_token_id
        if bos is None:
            bos = self.tokenizer.eos_token_id
        if bos is None:
            raise UserError(f"the tokenizer of '{self.name}' has neither a BOS nor an EOS token to start a text with")
        return bos

    def chat_prefix(self) -> str:
        """The text of the tokenizer's chat template for one user turn, up to where its content goes
        (Gemma: `<start_of_turn>user\\n`), without the BOS the template starts with (encode adds it).

        Raises UserError when the tokenizer has no chat template (a base model).
        """
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"search.prefix = \"chat\" needs a chat template, and the tokenizer of '{self.name}' "
                            "has none (a base model?): set search.prefix to the text itself, or to \"\"")
        marker = "\x00EPO_TUI_CONTENT\x00"
        try:
            rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
        except Exception as err:  # noqa: BLE001 - a template is a program: any failure is the template's
            raise UserError(f"the chat template of '{self.name}' fails on one user turn: {first_line(err)}") from None
        head = rendered.split(marker)[0]
        bos_text = self.tokenizer.bos_token or ""
        return head[len(bos_text):] if bos_text and head.startswith(bos_text) else head

    def prompt_ids(self, text: str, what: str = "the text") -> list[int]:
        """The ids of a text a user typed as (part of) a prompt.

        Raises UserError when the text is not UTF-8 or spells a special token (`<|endoftext|>`, `<bos>`, ...): the
        tokenizer would turn it into that special id, which no prompt may hold (DESIGN.md §3), and
        reading it as plain characters would not survive re-tokenization. One rule everywhere:
        `score`, seed prompts, `inject` and the UI's edit all come through here.
        """
        require_utf8(text, what)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        special = set(self.special_token_ids().tolist())
        names = [self.tokenizer.convert_ids_to_tokens(int(i)) for i in ids if i in special]
        spelled = [name for name in dict.fromkeys(names) if name in text]
        if spelled:
            listed = ", ".join(f"'{name}'" for name in spelled)
            raise UserError(f"{what} holds the special token {listed}, which a prompt never holds: remove it")
        if names:  # an unknown-token id for characters the vocabulary lacks
            raise UserError(f"{what} holds characters the tokenizer cannot encode (they become "
                            f"'{names[0]}'): remove them")
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


def resolve_dtype(name: str, devices: Sequence[Any] | None = None) -> str:
    """`model.dtype` as loaded: "float32" or "bfloat16" as named; "auto" is bfloat16 when the devices
    (default: this host's) are GPUs or TPUs, float32 otherwise."""
    if name != "auto":
        return name
    platform = (devices or jax.local_devices())[0].platform.lower()
    return "bfloat16" if platform in BFLOAT16_PLATFORMS else "float32"


def load_model(model_cfg: ModelConfig, source: str = "config", sae: Any = None) -> LanguageModel:
    """The checkpoint `model_cfg` names, loaded: read into host memory, then placed on a mesh of this
    host's devices with each layer split over `model_cfg.model_parallel` of them (engine/sharding.py).
    `sae`, when given, will go on the same mesh: its arrays count when checking the devices' memory.

    Raises UserError (one line, naming the folder) for a config, tokenizer or tensor that does not fit,
    and for weights the devices cannot hold (saying how many devices of what memory they need); never
    a bare exception for a checkpoint's content. `source` names the config file in errors."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig, AutoTokenizer

    folder = resolve_checkpoint_dir(model_cfg.name, model_cfg.path)
    try:  # transformers validates config.json's values itself (strict dataclasses; GPT-NeoX divides by the heads)
        hf_config = AutoConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, ArithmeticError, StrictDataclassError) as err:
        raise UserError(f"cannot read the config or tokenizer in '{folder}': {first_line(err)}") from None
    family = family_module(hf_config.model_type)
    cfg = family.Config.from_hf(hf_config)
    _check_sizes(cfg, folder)
    devices = jax.local_devices()
    dtype_name = resolve_dtype(model_cfg.dtype, devices)
    dtype = DTYPES[dtype_name]
    keep = getattr(family, "checkpoint_filter", lambda _: None)(hf_config)  # optional: models/__init__.py
    with sharding.on_host():  # no device holds the whole model before it is split
        checkpoint = CheckpointTensors(folder, read_safetensors(folder, keep=keep), hf_config)
        params = family.params_from_checkpoint(checkpoint, cfg, cfg.n_layers)
        params = jax.tree.map(lambda a: jnp.asarray(a, dtype=dtype), params)
    name = model_cfg.path or model_cfg.name
    what = f"{name} in {dtype_name}" + (" with its SAE" if sae is not None else "")
    model_parallel = sharding.choose_model_parallel((params, sae), model_cfg.model_parallel, what=what,
                                                    n_devices=len(devices), memory=sharding.device_memory(devices),
                                                    source=source)
    mesh = sharding.make_mesh(model_parallel, devices)
    return LanguageModel(name=name, model_type=hf_config.model_type, cfg=cfg,
                         params=sharding.place(params, mesh), tokenizer=tokenizer, dtype=dtype_name,
                         mesh=mesh)


_SIZES = ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_mlp", "vocab_size", "max_positions")


def _check_sizes(cfg: Any, folder) -> None:
    """Raises UserError when the config's sizes cannot make a model: each a positive integer, the
    query heads a multiple of the key-value heads, and without an explicit head_dim, d_model a
    multiple of the heads."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    for name in (n for n in _SIZES if n in fields):
        value = getattr(cfg, name)
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise UserError(f"the config in '{folder}' gives {name} = {value!r}: it must be a positive integer")
    if "n_kv_heads" in fields and cfg.n_heads % cfg.n_kv_heads:
        raise UserError(f"the config in '{folder}' gives {cfg.n_heads} attention heads, not a multiple of its "
                        f"{cfg.n_kv_heads} key-value heads")
    if "head_dim" not in fields and cfg.d_model % cfg.n_heads:
        raise UserError(f"the config in '{folder}' gives {cfg.n_heads} attention heads, which do not divide "
                        f"its hidden size {cfg.d_model}")
