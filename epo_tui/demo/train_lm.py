"""Byte-level BPE tokenizer and a small GPT-2 trained in JAX on the demo corpus, saved in HF format.

The forward pass is the engine's own (`epo_tui.engine.language_model.apply_model`, family gpt2), so the model
trains on exactly the function the search later runs. Weights are written under Hugging Face GPT-2
names (`transformer.h.0.attn.c_attn.weight`, Conv1D layout, tied embeddings) so both the engine's
loader and transformers' `AutoModelForCausalLM` read them.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from epo_tui.engine import text_rows
from epo_tui.engine.language_model import apply_model
from epo_tui.engine.text_rows import pack_rows
from epo_tui.engine.models.gpt2 import GPT2Config

EOT = "<|endoftext|>"


@dataclass(frozen=True)
class LMSpec:
    vocab_size: int = 4096
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    context: int = 128
    batch: int = 32
    steps: int = 450
    warmup: int = 40
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0


# ---------------------------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str], folder: Path, vocab_size: int):
    """Byte-level BPE (GPT-2 style, `<|endoftext|>` = BOS = EOS = id 0), saved for AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOT, eos_token=EOT, unk_token=EOT,
                                      model_max_length=None)
    folder.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(folder)
    return wrapped


def token_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """Every text's ids, each followed by `<|endoftext|>`, as one int32 stream."""
    return text_rows.token_stream(tokenizer, texts, tokenizer.convert_tokens_to_ids(EOT))


# ---------------------------------------------------------------------------------------------- model

def model_config(spec: LMSpec, vocab_size: int) -> GPT2Config:
    return GPT2Config(n_layers=spec.n_layers, d_model=spec.d_model, n_heads=spec.n_heads,
                      d_mlp=4 * spec.d_model, vocab_size=vocab_size, max_positions=spec.context,
                      layer_norm_eps=1e-5)


def init_params(cfg: GPT2Config, seed: int) -> dict:
    """GPT-2's initialisation: N(0, 0.02), residual writes scaled by 1/sqrt(2 * layers), norms at 1."""
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 4 + 4 * cfg.n_layers))
    D, F, H, K = cfg.d_model, cfg.d_mlp, cfg.n_heads, cfg.head_dim

    def normal(shape, std=0.02):
        return std * jax.random.normal(next(keys), shape, jnp.float32)

    proj_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    blocks = [{
        "ln1_g": jnp.ones(D), "ln1_b": jnp.zeros(D),
        "w_qkv_Dx3xHxK": normal((D, 3 * D)).reshape(D, 3, H, K), "b_qkv": jnp.zeros(3 * D),
        "w_o_HxKxD": normal((D, D), proj_std).reshape(H, K, D), "b_o": jnp.zeros(D),
        "ln2_g": jnp.ones(D), "ln2_b": jnp.zeros(D),
        "w_in_DxF": normal((D, F)), "b_in": jnp.zeros(F),
        "w_out_FxD": normal((F, D), proj_std), "b_out": jnp.zeros(D),
    } for _ in range(cfg.n_layers)]
    return {"wte_VxD": normal((cfg.vocab_size, D)), "wpe_PxD": normal((cfg.max_positions, D), 0.01),
            "lnf_g": jnp.ones(D), "lnf_b": jnp.zeros(D), "blocks": blocks}


_HF_NAMES = {"ln1_g": "ln_1.weight", "ln1_b": "ln_1.bias", "w_qkv_Dx3xHxK": "attn.c_attn.weight",
             "b_qkv": "attn.c_attn.bias", "w_o_HxKxD": "attn.c_proj.weight", "b_o": "attn.c_proj.bias",
             "ln2_g": "ln_2.weight", "ln2_b": "ln_2.bias", "w_in_DxF": "mlp.c_fc.weight", "b_in": "mlp.c_fc.bias",
             "w_out_FxD": "mlp.c_proj.weight", "b_out": "mlp.c_proj.bias"}


def checkpoint_from_params(params: dict, cfg: GPT2Config) -> dict[str, np.ndarray]:
    """The inverse of gpt2.params_from_checkpoint: HF GPT-2 names (transformer.*), float32 numpy."""
    out = {"transformer.wte.weight": params["wte_VxD"], "transformer.wpe.weight": params["wpe_PxD"],
           "transformer.ln_f.weight": params["lnf_g"], "transformer.ln_f.bias": params["lnf_b"]}
    for i, block in enumerate(params["blocks"]):
        flat = {**block, "w_qkv_Dx3xHxK": block["w_qkv_Dx3xHxK"].reshape(cfg.d_model, -1),  # Conv1D: in x out
                "w_o_HxKxD": block["w_o_HxKxD"].reshape(-1, cfg.d_model)}
        for ours, hf in _HF_NAMES.items():
            out[f"transformer.h.{i}.{hf}"] = flat[ours]
    return {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in out.items()}


def hf_config(cfg: GPT2Config):
    from transformers import GPT2Config as HFConfig

    return HFConfig(vocab_size=cfg.vocab_size, n_positions=cfg.max_positions, n_embd=cfg.d_model,
                    n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_mlp, activation_function="gelu_new",
                    layer_norm_epsilon=cfg.layer_norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
                    architectures=["GPT2LMHeadModel"])


def save_model(folder: Path, params: dict, cfg: GPT2Config) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(checkpoint_from_params(params, cfg), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "model.safetensors").chmod(0o644)  # safetensors writes 0600; the pack is shipped
    hf_config(cfg).save_pretrained(folder)


def n_params(params: dict) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# ---------------------------------------------------------------------------------------------- training

def _nll_sum(params: dict, cfg: GPT2Config, tokens_BxC: jnp.ndarray, mask_BxC: jnp.ndarray):
    """(summed next-token NLL over masked targets, number of targets)."""
    logits_BxCxV, _, _ = apply_model(params, tokens_BxC[:, :-1], model_type="gpt2", cfg=cfg, hooks=(),
                                     logits=True, center_writes=False)
    logp = jax.nn.log_softmax(logits_BxCxV, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens_BxC[:, 1:, None], axis=-1)[..., 0]
    m = mask_BxC[:, 1:].astype(jnp.float32)
    return (nll * m).sum(), m.sum()


def make_optimizer(spec: LMSpec):
    import optax

    schedule = optax.warmup_cosine_decay_schedule(0.0, spec.lr, spec.warmup, spec.steps,
                                                  end_value=spec.lr * spec.min_lr_ratio)
    decay_mask = lambda p: jax.tree.map(lambda x: x.ndim == 2, p)  # matrices and embeddings only
    return optax.chain(optax.clip_by_global_norm(spec.grad_clip),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=spec.weight_decay,
                                   mask=decay_mask)), schedule


def train(params: dict, cfg: GPT2Config, spec: LMSpec, tokens: np.ndarray, mask: np.ndarray,
          log=print, log_every: int = 50) -> tuple[dict, list[dict]]:
    """`spec.steps` AdamW steps on random batches of packed rows (seeded); returns params and a loss log."""
    import optax

    optimizer, schedule = make_optimizer(spec)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, tokens_BxC, mask_BxC):
        def loss_fn(p):
            total, count = _nll_sum(p, cfg, tokens_BxC, mask_BxC)
            return total / count
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(spec.seed)
    history, start, running = [], time.perf_counter(), []
    order = rng.permutation(len(tokens))
    cursor = 0
    for i in range(spec.steps):
        if cursor + spec.batch > len(order):  # a new epoch: a new seeded permutation
            order, cursor = rng.permutation(len(tokens)), 0
        idx = np.sort(order[cursor:cursor + spec.batch])
        cursor += spec.batch
        params, opt_state, loss = step(params, opt_state, tokens[idx], mask[idx])
        running.append(loss)
        if (i + 1) % log_every == 0 or i + 1 == spec.steps:
            mean = float(np.mean([float(x) for x in running]))
            running = []
            entry = {"step": i + 1, "loss": round(mean, 4), "lr": float(schedule(i)),
                     "seconds": round(time.perf_counter() - start, 1)}
            history.append(entry)
            log(f"step {entry['step']:5d}  loss {mean:.3f}  lr {entry['lr']:.2e}  {entry['seconds']:.0f}s")
    return params, history


def evaluate(params: dict, cfg: GPT2Config, tokens: np.ndarray, mask: np.ndarray, batch: int = 64) -> float:
    """Mean next-token cross-entropy (nats) over the masked targets."""
    fn = jax.jit(lambda p, t, m: _nll_sum(p, cfg, t, m))
    total = count = 0.0
    for s in range(0, len(tokens), batch):
        t, m = tokens[s:s + batch], mask[s:s + batch]
        if len(t) < batch:  # pad to a fixed shape so the jit compiles once
            t = np.concatenate([t, np.zeros((batch - len(t), t.shape[1]), t.dtype)])
            m = np.concatenate([m, np.zeros((batch - len(m), m.shape[1]), bool)])
        a, b = fn(params, t, m)
        total, count = total + float(a), count + float(b)
    return total / count


def unigram_xent(train_stream: np.ndarray, tokens: np.ndarray, mask: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy of the add-one-smoothed unigram distribution of train on the same held-out targets."""
    counts = np.bincount(train_stream, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    targets = tokens[:, 1:][mask[:, 1:]]
    return float(-logp[targets].mean())


def build_lm(corpus_dir: Path, out: Path, spec: LMSpec = LMSpec(), log=print) -> dict:
    """Tokenizer + LM from corpus_dir/{train,heldout}.jsonl into out/model; returns a report dict."""
    from epo_tui.demo.corpus import read_split

    t0 = time.perf_counter()
    train_texts, heldout_texts = read_split(corpus_dir / "train.jsonl"), read_split(corpus_dir / "heldout.jsonl")
    model_dir = out / "model"
    tokenizer = train_tokenizer(train_texts, model_dir, spec.vocab_size)
    vocab = len(tokenizer)
    bos = tokenizer.bos_token_id
    train_stream, heldout_stream = token_stream(tokenizer, train_texts), token_stream(tokenizer, heldout_texts)
    tok_seconds = time.perf_counter() - t0
    log(f"tokenizer: vocab {vocab}, train {len(train_stream):,} tokens, held-out {len(heldout_stream):,} "
        f"tokens ({tok_seconds:.0f}s)")
    train_tokens, train_mask = pack_rows(train_stream, spec.context, bos)
    heldout_tokens, heldout_mask = pack_rows(heldout_stream, spec.context, bos)

    cfg = model_config(spec, vocab)
    params = init_params(cfg, spec.seed)
    log(f"model: {n_params(params):,} parameters, {cfg}")
    t1 = time.perf_counter()
    params, history = train(params, cfg, spec, train_tokens, train_mask, log=log)
    train_seconds = time.perf_counter() - t1
    save_model(model_dir, params, cfg)
    report = {
        "spec": asdict(spec), "config": asdict(cfg), "parameters": n_params(params),
        "tokens": {"train": int(len(train_stream)), "heldout": int(len(heldout_stream)),
                   "tokens_seen": spec.steps * spec.batch * (spec.context - 1),
                   "epochs": round(spec.steps * spec.batch / len(train_tokens), 2)},
        "seconds": {"tokenizer": round(tok_seconds, 1), "train": round(train_seconds, 1)},
        "loss_log": history,
    }
    report["eval"] = eval_lm(out, log=log)
    (model_dir / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def eval_lm(out: Path, log=print, check_parity: bool = True) -> dict:
    """Held-out xent of the saved model (via the engine's loader) vs the unigram baseline; HF parity."""
    from transformers import AutoTokenizer

    from epo_tui.config import ModelConfig
    from epo_tui.demo.corpus import read_split
    from epo_tui.engine.language_model import load_model

    model_dir = out / "model"
    lm = load_model(ModelConfig(name=None, path=str(model_dir)))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    context = lm.cfg.max_positions
    train_stream = token_stream(tokenizer, read_split(out / "corpus" / "train.jsonl"))
    heldout_stream = token_stream(tokenizer, read_split(out / "corpus" / "heldout.jsonl"))
    tokens, mask = pack_rows(heldout_stream, context, tokenizer.bos_token_id)
    xent = evaluate(lm.params, lm.cfg, tokens, mask)
    uni = unigram_xent(train_stream, tokens, mask, lm.vocab_size)
    result = {"heldout_targets": int(mask[:, 1:].sum()), "heldout_xent_nats": round(xent, 4),
              "heldout_ppl": round(math.exp(xent), 2), "unigram_xent_nats": round(uni, 4),
              "unigram_ppl": round(math.exp(uni), 2)}
    log(f"held-out: LM {xent:.3f} nats/token (ppl {math.exp(xent):.1f}); unigram {uni:.3f} "
        f"(ppl {math.exp(uni):.1f}) on {result['heldout_targets']:,} tokens")
    if check_parity:
        result["hf_parity_max_abs_logit_diff"] = hf_parity(lm, model_dir, tokens[:4])
        log(f"parity with transformers: max |logit diff| {result['hf_parity_max_abs_logit_diff']:.2e}")
    return result


def hf_parity(lm, model_dir: Path, tokens_BxC: np.ndarray) -> float:
    """Max |logits(engine) - logits(transformers AutoModelForCausalLM)| on some held-out rows."""
    import torch
    from transformers import AutoModelForCausalLM

    ours, _ = lm.forward(jnp.asarray(tokens_BxC))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.as_tensor(np.asarray(tokens_BxC), dtype=torch.long)).logits.numpy()
    return float(np.abs(np.asarray(ours) - theirs).max())
