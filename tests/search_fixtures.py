"""Special tiny models and SAEs for the search tests (tests/test_search*.py).

- `write_char_model`: a GPT-2 checkpoint over a ~20-token character BPE (with BOS/EOS, pad, an extra
  special token and padding rows past the tokenizer), small enough to enumerate every prompt of 2-3
  tokens. Some token sequences do not re-tokenize to themselves ("a" "b" decodes to "ab", one token).
- `write_two_feature_model`: a hand-built one-layer GPT-2 whose only attention head copies the
  previous token into its own subspace, and an SAE on `blocks.0.hook_resid_mid` whose latent 0 reads
  "the current token is `a`" and latent 1 "the previous token is `b`": both can fire at one position
  only when the prompt ends in "b a".
- `make_config`: a Config naming a local model and SAE folder, without a TOML file.
- `full_forward`: the plain forward pass over the whole prompt (no prefix cache), for independent checks;
  `independent_numbers`: a search's objective, activation and xent by it.
- `HELDOUT_TEXTS`: a few documents of held-out text.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from epo_tui.config import Config, FeatureConfig, ModelConfig, SAEConfig, SearchConfig

BOS = "<|endoftext|>"
PAD = "<pad>"
SEP = "<sep>"  # an additional special token
CHARS = "abcdefgh"
# merges, in rank order: "a" "b" -> "ab", ...; so e.g. the ids of "a", "b" decode to "ab" and
# re-tokenize to the one id of "ab"
MERGES = [("a", "b"), ("c", "d"), ("e", "f"), ("ab", "c"), ("g", "h"), ("h", "a"), ("d", "d"),
          ("b", "e"), ("f", "g"), ("cd", "e")]
HELDOUT_TEXTS = ["The quick brown fox jumps over the lazy dog. " * 6,
                 "A second document, shorter than a row.",
                 "Numbers 1 2 3 4 5 6 7 8 9 and words go on and on until the row is full of them. " * 4]
EXTRA_ROWS = 3  # embedding rows past the tokenizer's vocabulary (as real checkpoints pad to 64)


def write_char_tokenizer(folder: Path) -> int:
    """A character-level BPE (no pre-tokenizer; decoding concatenates); returns len(tokenizer)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {BOS: 0, PAD: 1, SEP: 2}
    for c in CHARS:
        vocab[c] = len(vocab)
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=MERGES, unk_token=BOS))
    tokenizer.decoder = decoders.Fuse()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=BOS, unk_token=BOS,
                                      pad_token=PAD, additional_special_tokens=[SEP])
    wrapped.save_pretrained(folder)
    return len(wrapped)


def write_char_model(folder: Path, seed: int = 0, n_layer: int = 2, initializer_range: float = 0.15) -> Path:
    """A random GPT-2 over the character BPE, with EXTRA_ROWS embedding rows no token uses."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_tokens = write_char_tokenizer(folder)
    config = GPT2Config(vocab_size=n_tokens + EXTRA_ROWS, n_positions=32, n_embd=32, n_layer=n_layer, n_head=4,
                        bos_token_id=0, eos_token_id=0, pad_token_id=1, initializer_range=initializer_range)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    return folder


def make_config(model_dir: Path, sae_dir: Path, feature: int | tuple[int, ...] = 0, *,
                combine: str = "lp", **search) -> Config:
    """A Config over local folders; `feature` is one index or several (combined by `combine`)."""
    if isinstance(feature, tuple):
        feature_cfg = FeatureConfig(index=feature[0], indices=feature, combine=combine)
    else:
        feature_cfg = FeatureConfig(index=feature)
    return Config(model=ModelConfig(name=None, path=str(model_dir)),
                  sae=SAEConfig(release=None, id=None, path=str(sae_dir)),
                  feature=feature_cfg, search=SearchConfig(**search))


def full_forward(pair, full_ids_BxL):
    """(logits_BxLxV, sae_input_BxLxD) of the whole prompts by the plain forward pass (no prefix kv)."""
    import jax.numpy as jnp

    logits, acts = pair.model.forward(jnp.asarray(np.asarray(full_ids_BxL), jnp.int32), hooks=(pair.sae.hook_name,),
                                      logits=True, center_writes=pair.center_writes)
    return np.asarray(logits, np.float64), acts[pair.sae.hook_name]


def xent_of(logits_BxLxV: np.ndarray, full_ids_BxL: np.ndarray, n_optimized: int) -> np.ndarray:
    """Mean over the last n positions of -log p(token | everything before it), in float64."""
    logits = logits_BxLxV - logits_BxLxV.max(-1, keepdims=True)
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    L = full_ids_BxL.shape[1]
    positions = np.arange(L - n_optimized, L)
    picked = np.take_along_axis(logprobs[:, positions - 1], full_ids_BxL[:, positions, None], axis=-1)[..., 0]
    return -picked.mean(-1)


# ----------------------------------------------------------------------------------------------
# Two latents that can fire together at one position only through attention to the previous token

TWO_FEATURE_WORDS = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"]
TWO_FEATURE_HOOK = "blocks.0.hook_resid_mid"
N_POSITIONS = 16


def write_word_tokenizer(folder: Path, words: list[str]) -> int:
    """Single letters as words (a WordLevel tokenizer: decode joins with spaces, encode splits them)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {BOS: 0}
    for w in words:
        vocab[w] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=BOS))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=BOS, unk_token=BOS)
    wrapped.save_pretrained(folder)
    return len(wrapped)


def write_two_feature_model(folder: Path, token_scale: float = 4.0, position_scale: float = 4.0,
                            sharpness: float = 40.0, unembed_gain: float = 0.1,
                            disfavour: float = 0.75) -> tuple[Path, Path, int, int]:
    """(model_dir, sae_dir, id of "a", id of "b"): see the module docstring.

    Residual basis (orthonormal, orthogonal to the all-ones vector, so LayerNorm's and
    TransformerLens's centring leave it alone): one direction per token ("current token"), one per
    position, one per token again ("previous token"), and a "liking" direction u. Token rows have
    +1 along u, but "a" and "b" have -1; token and position rows all have the same norms, so
    LayerNorm only rescales (by the same factor everywhere).

    The one head (head_dim = d_model) has q_i . k_j = sharpness * [j == i - 1] (in LayerNorm units),
    so position i attends to position i - 1 (position 0 to itself); its value/output copies the
    current-token direction of that position into the previous-token subspace. The MLP is zero.
    Unembedding = embedding (tied), so the model predicts a repeat of the current token (by a logit
    margin of about 2.2 with the defaults), and ln_f's bias along u makes "a" and "b" less likely
    than the other tokens by 2 * `disfavour` (less than the repeat margin). Fluent prompts repeat
    themselves and avoid "a" and "b": a search for "a" last ends "a a", one for "b" before the last
    ends "b b", and "b a" costs fluency that only a search for both has a reason to pay.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import GPT2Config

    folder = Path(folder)
    model_dir, sae_dir = folder / "model", folder / "sae"
    model_dir.mkdir(parents=True, exist_ok=True)
    V = write_word_tokenizer(model_dir, TWO_FEATURE_WORDS)
    D = 64
    assert 1 + V + N_POSITIONS + V + 1 <= D
    rng = np.random.default_rng(0)
    # an orthonormal basis whose first column is the all-ones direction: use the others
    M = np.concatenate([np.ones((D, 1)), rng.normal(size=(D, D - 1))], axis=1)
    Q, _ = np.linalg.qr(M)
    basis = Q[:, 1:].T  # (D - 1) x D rows, each orthogonal to ones
    cur = basis[:V]
    pos = basis[V:V + N_POSITIONS]
    prev = basis[V + N_POSITIONS:2 * V + N_POSITIONS]
    liking = basis[2 * V + N_POSITIONS]

    tok_a, tok_b = 1 + TWO_FEATURE_WORDS.index("a"), 1 + TWO_FEATURE_WORDS.index("b")
    sign = np.ones(V)
    sign[[tok_a, tok_b]] = -1.0
    wte = token_scale * cur + sign[:, None] * liking
    wpe = position_scale * pos
    # ln_1 rescales every residual by sqrt(D) / |x|, the same everywhere
    ln_scale = np.sqrt(D) / np.sqrt(token_scale**2 + position_scale**2 + 1.0)
    H = D  # one head
    w_q = np.zeros((D, H))
    w_k = np.zeros((D, H))
    for i in range(N_POSITIONS):
        w_k[:, i] = pos[i] / (position_scale * ln_scale)  # k_j = e_j
        if i > 0:
            w_q[:, i - 1] = pos[i] * np.sqrt(H) * sharpness / (position_scale * ln_scale)  # q_i = s e_{i-1}
    w_v = np.zeros((D, H))
    w_o = np.zeros((H, D))
    for t in range(V):
        w_v[:, t] = cur[t] / (token_scale * ln_scale)  # v_j = e_(token j)
        w_o[t] = token_scale * prev[t]  # -> the previous-token direction of that token
    config = GPT2Config(vocab_size=V, n_positions=N_POSITIONS, n_embd=D, n_layer=1, n_head=1, n_inner=4 * D,
                        bos_token_id=0, eos_token_id=0, layer_norm_epsilon=1e-5)
    f32 = lambda a: torch.tensor(np.asarray(a, np.float32))  # noqa: E731
    tensors = {
        "transformer.wte.weight": f32(wte), "transformer.wpe.weight": f32(wpe),
        "transformer.ln_f.weight": f32(np.full(D, unembed_gain)), "transformer.ln_f.bias": f32(disfavour * liking),
        "transformer.h.0.ln_1.weight": f32(np.ones(D)), "transformer.h.0.ln_1.bias": f32(np.zeros(D)),
        "transformer.h.0.attn.c_attn.weight": f32(np.concatenate([w_q, w_k, w_v], axis=1)),
        "transformer.h.0.attn.c_attn.bias": f32(np.zeros(3 * D)),
        "transformer.h.0.attn.c_proj.weight": f32(w_o), "transformer.h.0.attn.c_proj.bias": f32(np.zeros(D)),
        "transformer.h.0.ln_2.weight": f32(np.ones(D)), "transformer.h.0.ln_2.bias": f32(np.zeros(D)),
        "transformer.h.0.mlp.c_fc.weight": f32(np.zeros((D, 4 * D))),
        "transformer.h.0.mlp.c_fc.bias": f32(np.zeros(4 * D)),
        "transformer.h.0.mlp.c_proj.weight": f32(np.zeros((4 * D, D))),
        "transformer.h.0.mlp.c_proj.bias": f32(np.zeros(D)),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, model_dir / "model.safetensors",
              metadata={"format": "pt"})
    config.save_pretrained(model_dir)

    # the SAE: latent 0 = current token is "a", latent 1 = previous token is "b"; the rest random
    from safetensors.numpy import load_file, save_file as save_np

    from epo_tui.engine.sae_writer import write_random_sae

    write_random_sae(sae_dir, d_in=D, d_sae=8, hook_name=TWO_FEATURE_HOOK, seed=1, apply_b_dec_to_input=False,
                     input_norm=float(np.sqrt(token_scale**2 * 2 + position_scale**2 + 1.0)), write_sparsity=False)
    weights = load_file(str(sae_dir / "sae_weights.safetensors"))
    W_enc = weights["W_enc"].copy()
    b_enc = weights["b_enc"].copy()
    W_enc[:, 0] = cur[tok_a] / token_scale  # pre = 1 on "a", 0 elsewhere, before the bias
    W_enc[:, 1] = prev[tok_b] / token_scale  # pre = 1 after "b" (attention is nearly one-hot)
    b_enc[:2] = -0.5
    weights.update(W_enc=W_enc.astype(np.float32), b_enc=b_enc.astype(np.float32),
                   b_dec=np.zeros(D, np.float32))
    save_np(weights, str(sae_dir / "sae_weights.safetensors"))
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    assert cfg["apply_b_dec_to_input"] is False
    return model_dir, sae_dir, tok_a, tok_b


# ----------------------------------------------------------------------------------------------
# The character model with latents whose best prompt does not re-tokenize to itself

CHAR_HOOK = "blocks.1.hook_resid_pre"
PLANTED = {2: 14, 3: 15}  # prompt length -> the latent planted for it
PLANTED_PENALTY = 0.3  # the penalty for which the planted latent's best prompt is invalid


def all_prompts(tokenizer, n_tokens: int, special_ids) -> tuple[np.ndarray, np.ndarray]:
    """(every prompt of n non-special tokens, whether each re-tokenizes to itself)."""
    import itertools

    allowed = [i for i in range(len(tokenizer)) if i not in set(int(s) for s in special_ids)]
    every = np.array(list(itertools.product(allowed, repeat=n_tokens)), np.int32)
    valid = np.array([tokenizer(tokenizer.decode(p.tolist(), clean_up_tokenization_spaces=False),
                                add_special_tokens=False)["input_ids"] == p.tolist() for p in every])
    return every, valid


def write_char_setup(folder: Path, margin: float = 0.2) -> tuple[Path, Path]:
    """(model_dir, sae_dir): the character GPT-2 and a random SAE on its blocks.1 residual, where for
    n in PLANTED latent PLANTED[n] is a direction chosen (seeded random search) so that, among all
    prompts of n tokens, pre-activation - PLANTED_PENALTY * xent is largest for one that does not
    re-tokenize to itself, by `margin` over the best that does: a search that ignored the
    re-tokenization rule would beat the true optimum."""
    from safetensors.numpy import load_file, save_file

    from epo_tui.engine.pairing import load_model_with_sae
    from epo_tui.engine.sae_writer import write_random_sae

    import shutil

    folder = Path(folder)
    model_dir, sae_dir, probe_dir = folder / "model", folder / "sae", folder / "sae-unplanted"
    write_char_model(model_dir)
    write_random_sae(probe_dir, d_in=32, d_sae=16, hook_name=CHAR_HOOK, seed=0, input_norm=3.0)
    pair = load_model_with_sae(make_config(model_dir, probe_dir))  # (the final folder is never cached early)
    shutil.copytree(probe_dir, sae_dir)
    tokenizer = pair.model.tokenizer
    weights = load_file(str(sae_dir / "sae_weights.safetensors"))
    rng = np.random.default_rng(0)
    for n_tokens, latent in PLANTED.items():
        every, valid = all_prompts(tokenizer, n_tokens, pair.model.special_token_ids())
        full = np.concatenate([np.full((len(every), 1), tokenizer.bos_token_id, np.int32), every], axis=1)
        logits, sae_in = full_forward(pair, full)
        xent = xent_of(logits, full, n_tokens)
        x = np.asarray(sae_in[:, -1], np.float64)
        if pair.sae.apply_b_dec_to_input:
            x = x - np.asarray(pair.sae.b_dec_D, np.float64)
        b = float(weights["b_enc"][latent])
        for _ in range(1000):
            u = rng.normal(size=x.shape[1])
            u *= 3.0 / (x @ u).std()
            f = x @ u + b - PLANTED_PENALTY * xent
            if not valid[np.argmax(f)] and f.max() > f[valid].max() + margin:
                break
        else:
            raise AssertionError("no direction found whose best prompt is invalid")
        weights["W_enc"][:, latent] = u.astype(np.float32)
    save_file(weights, str(sae_dir / "sae_weights.safetensors"))
    return model_dir, sae_dir


def independent_numbers(pair, search, tokens_KxN):
    """(objective_K, act_K, xent_K, full ids_KxL, per-position activations_KxL, logits_KxLxV) of `search`'s
    prompts tokens_KxN by the plain forward pass, to check the search's own numbers against."""
    from epo_tui.engine.sae import activations, pre_activations

    prefix = np.asarray(pair.model.encode("", search.config.search.prefix))
    full = np.concatenate([np.broadcast_to(prefix, (len(tokens_KxN), len(prefix))), tokens_KxN], axis=1)
    logits, sae_in = full_forward(pair, full)
    feature = search.config.feature.index
    acts_KxL = np.asarray(activations(pair.sae, sae_in))[..., feature]
    pre_KxL = np.asarray(pre_activations(pair.sae, sae_in))[..., feature]
    xent = xent_of(logits, full, tokens_KxN.shape[1])
    return pre_KxL[:, -1], acts_KxL[:, -1], xent, full, acts_KxL, logits
