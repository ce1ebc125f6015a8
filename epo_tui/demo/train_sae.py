"""A standard ReLU SAE on one residual hook of the demo LM, trained in JAX, saved as a sae-lens folder.

Activations: the hook's value as the search computes it for this SAE. The SAE's metadata leaves
model_class_name at its default (a TransformerLens model) and says center_writing_weights=True, so
`epo_tui.engine.pairing` runs the model with centred residual writes: the activations here are
collected with `center_writes=True` to match (`pairing_activations` checks it). The BOS position (an
outlier in norm) and padding are skipped.

Training (sae-lens's standard recipe): inputs scaled by one constant so E||x||^2 = d_in (folded back
into the weights when saving, so the saved SAE reads raw hook values, and decoder rows then scaled to
unit norm with the encoder scaled to match); loss = sum_D (x - x_hat)^2 +
l1 * sum_S |f| * ||W_dec row|| (mean over the batch); W_dec rows initialised at norm 0.1, W_enc =
W_dec^T, b_dec at the activations' mean, b_enc 0; Adam (b1 0.9, b2 0.999); l1 linearly warmed up;
learning rate decayed linearly to 0 over the last 20% of steps; latents that fired on none of the
recent batches are re-initialised (twice, at 25% and 50% of training) towards the worst-reconstructed
inputs, with a fresh optimiser state.

Shapes: N tokens, D d_in, S d_sae, B batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


# The SAE reads TransformerLens's centred residual (as GPT-2 res-jb SAEs do); its metadata says so
# (center_writing_weights), and the pairing then runs the model the same way.
CENTER_WRITES = True


@dataclass(frozen=True)
class SAESpec:
    hook_name: str = "blocks.2.hook_resid_pre"
    d_sae: int = 2048
    train_tokens: int = 400_000  # activations collected from the train split
    steps: int = 2000
    batch: int = 2048
    lr: float = 4e-4
    l1_coefficient: float = 6.0
    l1_warmup_frac: float = 0.05
    lr_decay_frac: float = 0.2
    resample_at: tuple[float, ...] = (0.25, 0.5)  # fractions of training
    dead_window: int = 200  # a latent is dead if it fired on none of this many recent batches
    decoder_init_norm: float = 0.1
    seed: int = 0


@dataclass
class SAEResult:
    """Trained weights for raw (unscaled) inputs, as sae-lens stores them."""

    W_enc_DxS: np.ndarray
    b_enc_S: np.ndarray
    W_dec_SxD: np.ndarray
    b_dec_D: np.ndarray
    scale: float  # the input scaling used in training (folded into the weights above)
    history: list[dict]
    resampled: list[int]


# ---------------------------------------------------------------------------------------------- activations

def hook_activations(lm, tokens_NxC: np.ndarray, mask_NxC: np.ndarray, hook_name: str,
                     batch: int = 64) -> np.ndarray:
    """Float32 activations (tokens x D) of `hook_name` at the masked positions, centred writes on."""
    out = []
    for s in range(0, len(tokens_NxC), batch):
        t, m = tokens_NxC[s:s + batch], mask_NxC[s:s + batch]
        n = len(t)
        if n < batch:  # fixed shape: one compilation
            t = np.concatenate([t, np.zeros((batch - n, t.shape[1]), t.dtype)])
        _, acts = lm.forward(jnp.asarray(t), hooks=(hook_name,), logits=False, center_writes=CENTER_WRITES)
        out.append(np.asarray(acts[hook_name][:n], dtype=np.float32)[m])
    return np.concatenate(out)


def collect(lm, texts: list[str], hook_name: str, max_tokens: int | None, seed: int = 0) -> np.ndarray:
    """Activations of rows (BOS + 127 stream tokens) of `texts`, BOS position dropped; a seeded
    random subset of rows when max_tokens is given."""
    from epo_tui.demo.train_lm import token_stream
    from epo_tui.engine.text_rows import pack_rows

    stream = token_stream(lm.tokenizer, texts)
    tokens, mask = pack_rows(stream, lm.cfg.max_positions, lm.tokenizer.bos_token_id)
    if max_tokens is not None:
        rows = math.ceil(max_tokens / (tokens.shape[1] - 1))
        if rows < len(tokens):
            pick = np.sort(np.random.default_rng(seed).permutation(len(tokens))[:rows])
            tokens, mask = tokens[pick], mask[pick]
    acts = hook_activations(lm, tokens, mask, hook_name)
    return acts if max_tokens is None else acts[:max_tokens]


# ---------------------------------------------------------------------------------------------- the SAE

def encode(params: dict, x_BxD: jnp.ndarray) -> jnp.ndarray:
    return jax.nn.relu((x_BxD - params["b_dec"]) @ params["W_enc"] + params["b_enc"])


def decode(params: dict, f_BxS: jnp.ndarray) -> jnp.ndarray:
    return f_BxS @ params["W_dec"] + params["b_dec"]


def init_params(d_in: int, d_sae: int, mean_D: np.ndarray, spec: SAESpec) -> dict:
    key = jax.random.PRNGKey(spec.seed)
    W_dec = jax.random.uniform(key, (d_sae, d_in), jnp.float32, -1.0, 1.0)
    W_dec = spec.decoder_init_norm * W_dec / jnp.linalg.norm(W_dec, axis=1, keepdims=True)
    return {"W_enc": W_dec.T.copy(), "b_enc": jnp.zeros(d_sae), "W_dec": W_dec, "b_dec": jnp.asarray(mean_D)}


def loss_parts(params: dict, x_BxD: jnp.ndarray):
    f_BxS = encode(params, x_BxD)
    x_hat = decode(params, f_BxS)
    mse = ((x_hat - x_BxD) ** 2).sum(-1).mean()
    l1 = (f_BxS * jnp.linalg.norm(params["W_dec"], axis=1)).sum(-1).mean()
    return mse, l1, f_BxS


def train_sae(acts_NxD: np.ndarray, spec: SAESpec, log=print, log_every: int = 250) -> SAEResult:
    """Trains on float32 activations (rows sampled with replacement-free seeded permutations)."""
    import optax

    N, D = acts_NxD.shape
    scale = float(math.sqrt(D / np.mean(np.sum(acts_NxD.astype(np.float64) ** 2, axis=1))))
    x_all = jnp.asarray(acts_NxD * np.float32(scale))
    total_var = float(((x_all - x_all.mean(0)) ** 2).sum(-1).mean())  # sum_D Var(x_d), scaled units
    params = init_params(D, spec.d_sae, np.asarray(x_all.mean(0)), spec)
    decay_start = int(spec.steps * (1 - spec.lr_decay_frac))
    lr_schedule = optax.join_schedules(
        [optax.constant_schedule(spec.lr),
         optax.linear_schedule(spec.lr, 0.0, max(1, spec.steps - decay_start))], [decay_start])
    optimizer = optax.adam(lr_schedule)
    opt_state = optimizer.init(params)
    warm = max(1, int(spec.steps * spec.l1_warmup_frac))

    @jax.jit
    def step(params, opt_state, idx_B, l1_coef):
        x = x_all[idx_B]

        def loss_fn(p):
            mse, l1, f = loss_parts(p, x)
            return mse + l1_coef * l1, (mse, l1, (f > 0).any(0), ((f > 0).sum(-1)).mean())
        (loss, (mse, l1, fired_S, l0)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, mse, l0, fired_S

    rng = np.random.default_rng(spec.seed)
    order, cursor = rng.permutation(N), 0
    last_fired = np.zeros(spec.d_sae, dtype=np.int64)
    resample_steps = {int(spec.steps * f) for f in spec.resample_at}
    history, resampled, running = [], [], []
    start = time.perf_counter()
    # the resampling step rebuilds the optimiser state; the schedule keeps its place via the count
    for i in range(spec.steps):
        if cursor + spec.batch > N:
            order, cursor = rng.permutation(N), 0
        idx = jnp.asarray(order[cursor:cursor + spec.batch])
        cursor += spec.batch
        l1_coef = spec.l1_coefficient * min(1.0, (i + 1) / warm)
        params, opt_state, mse, l0, fired_S = step(params, opt_state, idx, l1_coef)
        last_fired[np.asarray(fired_S)] = i
        running.append((mse, l0))
        if i + 1 in resample_steps:
            dead = np.flatnonzero(last_fired < i + 1 - spec.dead_window)
            params = _resample(params, x_all, dead, rng)
            opt_state = _fresh_adam_state(optimizer, params, opt_state)
            last_fired[dead] = i
            resampled.append(int(len(dead)))
            log(f"step {i + 1}: re-initialised {len(dead)} dead latents")
        if (i + 1) % log_every == 0 or i + 1 == spec.steps:
            mse_m = float(np.mean([float(a) for a, _ in running]))
            l0_m = float(np.mean([float(b) for _, b in running]))
            running = []
            entry = {"step": i + 1, "mse_scaled": round(mse_m, 3),
                     "fve_train_batches": round(1 - mse_m / total_var, 4),
                     "l0": round(l0_m, 1), "seconds": round(time.perf_counter() - start, 1)}
            history.append(entry)
            log(f"step {entry['step']:5d}  mse {mse_m:.3f}  fve~{entry['fve_train_batches']:.3f}  "
                f"l0 {l0_m:.1f}  {entry['seconds']:.0f}s")
    p = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}
    W_enc, b_enc, W_dec = unit_norm_decoder(p["W_enc"] * scale, p["b_enc"], p["W_dec"] / scale)
    return SAEResult(W_enc_DxS=W_enc, b_enc_S=b_enc, W_dec_SxD=W_dec, b_dec_D=p["b_dec"] / scale, scale=scale,
                     history=history, resampled=resampled)


def unit_norm_decoder(W_enc_DxS: np.ndarray, b_enc_S: np.ndarray, W_dec_SxD: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same SAE (same reconstructions, same L0) with unit-norm decoder rows, as sae-lens's standard
    SAEs have: each activation is then the latent's magnitude along its decoder direction, in the
    residual's own units (for the demo about 3x the training units), closer to the scale the search's
    default fluency penalties were set for."""
    norms_S = np.linalg.norm(W_dec_SxD, axis=1).astype(np.float32)
    return W_enc_DxS * norms_S, b_enc_S * norms_S, W_dec_SxD / norms_S[:, None]


def _fresh_adam_state(optimizer, params, opt_state):
    """A new Adam state (moments zero) that keeps the step count, so the lr schedule continues."""
    new = optimizer.init(params)
    return jax.tree.map(lambda old, fresh: old if getattr(old, "dtype", None) == jnp.int32 and old.ndim == 0
                        else fresh, opt_state, new)


def _resample(params: dict, x_all: jnp.ndarray, dead: np.ndarray, rng, sample: int = 16384) -> dict:
    """Dead latents point at inputs the SAE reconstructs worst (chosen with probability ~ loss^2)."""
    if len(dead) == 0:
        return params
    idx = rng.choice(x_all.shape[0], size=min(sample, x_all.shape[0]), replace=False)
    x = x_all[jnp.asarray(idx)]
    err = np.asarray(((decode(params, encode(params, x)) - x) ** 2).sum(-1), dtype=np.float64)
    pick = rng.choice(len(idx), size=len(dead), replace=len(dead) > len(idx), p=err / err.sum())
    direction = np.array(x[jnp.asarray(pick)] - params["b_dec"], dtype=np.float32)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True) + 1e-8
    alive = np.setdiff1d(np.arange(params["W_enc"].shape[1]), dead)
    enc_norm = float(np.mean(np.linalg.norm(np.asarray(params["W_enc"])[:, alive], axis=0))) if len(alive) else 1.0
    W_dec = np.asarray(params["W_dec"]).copy()
    W_enc = np.asarray(params["W_enc"]).copy()
    b_enc = np.asarray(params["b_enc"]).copy()
    W_dec[dead] = direction * np.mean(np.linalg.norm(W_dec[alive], axis=1)) if len(alive) else direction
    W_enc[:, dead] = direction.T * enc_norm * 0.2
    b_enc[dead] = 0.0
    return {**params, "W_dec": jnp.asarray(W_dec), "W_enc": jnp.asarray(W_enc), "b_enc": jnp.asarray(b_enc)}


# ---------------------------------------------------------------------------------------------- metrics

def sae_metrics(result_or_arrays, acts_NxD: np.ndarray, batch: int = 8192) -> dict:
    """FVE = 1 - sum ||x - x_hat||^2 / sum ||x - mean x||^2, mean L0, alive fraction, per-latent firing
    rate, over the given activations (float64 sums)."""
    W_enc, b_enc, W_dec, b_dec = (result_or_arrays[k] if isinstance(result_or_arrays, dict)
                                  else getattr(result_or_arrays, k)
                                  for k in ("W_enc_DxS", "b_enc_S", "W_dec_SxD", "b_dec_D"))
    params = {"W_enc": jnp.asarray(W_enc), "b_enc": jnp.asarray(b_enc), "W_dec": jnp.asarray(W_dec),
              "b_dec": jnp.asarray(b_dec)}

    @jax.jit
    def chunk(x, valid_B):
        f = encode(params, x)
        on = (f > 0) & valid_B[:, None]
        return ((decode(params, f) - x) ** 2).sum(-1) * valid_B, on.sum(-1), on.sum(0)

    sse = l0 = 0.0
    fires = np.zeros(W_enc.shape[1], dtype=np.int64)
    N = len(acts_NxD)
    for s in range(0, N, batch):
        x = acts_NxD[s:s + batch]
        n = len(x)
        if n < batch:  # fixed shape: one compilation; padding rows are masked out
            x = np.concatenate([x, np.zeros((batch - n, x.shape[1]), x.dtype)])
        e, l, c = chunk(jnp.asarray(x), jnp.asarray(np.arange(batch) < n))
        sse += float(np.asarray(e, np.float64).sum())
        l0 += float(np.asarray(l, np.float64).sum())
        fires += np.asarray(c, np.int64)
    x64 = acts_NxD.astype(np.float64)
    sst = float(((x64 - x64.mean(0)) ** 2).sum())
    rate = fires / N
    return {"tokens": int(N), "fve": 1 - sse / sst, "l0": l0 / N, "alive_fraction": float((fires > 0).mean()),
            "firing_rate": rate}


# ---------------------------------------------------------------------------------------------- saving

def demo_neuronpedia_id(model_name: str, hook_name: str) -> str:
    """The Neuronpedia-style id ("<modelId>/<layer>") the demo SAE carries and its labels name, so its
    labels are checked against it like any export, e.g. "epo-tui-demo-gpt2/2-res-demo"."""
    match = re.match(r"blocks\.(\d+)\.", hook_name)
    if match is None:
        raise ValueError(f"the demo SAE reads a block's hook (blocks.L.*), not {hook_name!r}")
    return f"{model_name}/{match.group(1)}-res-demo"


def save_sae(folder: Path, result: SAEResult, spec: SAESpec, firing_rate_S: np.ndarray,
             model_name: str = "epo-tui-demo-gpt2", context_size: int = 128) -> Path:
    """sae-lens StandardSAE + save_model (cfg.json, sae_weights.safetensors) + sparsity.safetensors."""
    import torch
    from safetensors.torch import save_file
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.constants import SPARSITY_FILENAME
    from sae_lens.saes.sae import SAEMetadata

    folder = Path(folder)
    D, S = result.W_enc_DxS.shape
    metadata = SAEMetadata(model_name=model_name, hook_name=spec.hook_name, hook_head_index=None,
                           prepend_bos=True, context_size=context_size,
                           model_from_pretrained_kwargs={"center_writing_weights": CENTER_WRITES},
                           neuronpedia_id=demo_neuronpedia_id(model_name, spec.hook_name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = StandardSAE(StandardSAEConfig(d_in=D, d_sae=S, dtype="float32", device="cpu",
                                            apply_b_dec_to_input=True, normalize_activations="none",
                                            metadata=metadata))
    with torch.no_grad():
        sae.W_enc.data = torch.from_numpy(np.array(result.W_enc_DxS, dtype=np.float32))
        sae.b_enc.data = torch.from_numpy(np.array(result.b_enc_S, dtype=np.float32))
        sae.W_dec.data = torch.from_numpy(np.array(result.W_dec_SxD, dtype=np.float32))
        sae.b_dec.data = torch.from_numpy(np.array(result.b_dec_D, dtype=np.float32))
    sae.save_model(folder)
    rate = torch.from_numpy(np.asarray(firing_rate_S, dtype=np.float32))
    save_file({"sparsity": torch.log10(rate + 1e-10).contiguous()}, str(folder / SPARSITY_FILENAME))
    for f in folder.iterdir():
        f.chmod(0o644)
    return folder


def load_saved_arrays(folder: Path) -> dict:
    from safetensors.numpy import load_file

    w = load_file(str(Path(folder) / "sae_weights.safetensors"))
    return {"W_enc_DxS": w["W_enc"], "b_enc_S": w["b_enc"], "W_dec_SxD": w["W_dec"], "b_dec_D": w["b_dec"]}


# ---------------------------------------------------------------------------------------------- the stage

def _load_lm(out: Path):
    from epo_tui.config import ModelConfig
    from epo_tui.engine.language_model import load_model

    return load_model(ModelConfig(name=None, path=str(out / "model")))


def build_sae(out: Path, spec: SAESpec = SAESpec(), log=print) -> dict:
    """OUT/model + OUT/corpus/train.jsonl -> OUT/sae (ends with eval_sae); returns a report dict."""
    from epo_tui.demo.corpus import read_split

    t0 = time.perf_counter()
    lm = _load_lm(out)
    acts = collect(lm, read_split(out / "corpus" / "train.jsonl"), spec.hook_name, spec.train_tokens, spec.seed)
    t_collect = time.perf_counter() - t0
    log(f"collected {acts.shape[0]:,} activations of {spec.hook_name} ({acts.nbytes / 1e6:.0f} MB, "
        f"{t_collect:.0f}s); mean norm {np.linalg.norm(acts, axis=1).mean():.2f}")
    t1 = time.perf_counter()
    result = train_sae(acts, spec, log=log)
    t_train = time.perf_counter() - t1
    train_m = sae_metrics(result, acts)
    log(f"train: fve {train_m['fve']:.3f}  l0 {train_m['l0']:.1f}  alive {train_m['alive_fraction']:.1%}")
    del acts
    save_sae(out / "sae", result, spec, train_m["firing_rate"], context_size=lm.cfg.max_positions)
    report = {"spec": asdict(spec), "input_scale": result.scale, "resampled": result.resampled,
              "seconds": {"collect": round(t_collect, 1), "train": round(t_train, 1)},
              "train": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in train_m.items()
                        if k != "firing_rate"},
              "loss_log": result.history}
    report["eval"] = eval_sae(out, log=log, lm=lm)
    report["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    (out / "sae" / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def eval_sae(out: Path, log=print, lm=None) -> dict:
    """Held-out FVE, L0 and alive fraction of OUT/sae, with activations computed the way the search
    computes them (the engine's load_sae + pairing), checked against this module's collection."""
    from epo_tui.config import SAEConfig
    from epo_tui.demo.corpus import read_split
    from epo_tui.engine.sae_loading import load_sae

    lm = lm or _load_lm(out)
    with tempfile.TemporaryDirectory() as cache:
        sae = load_sae(SAEConfig(path=str(out / "sae")), cache_root=Path(cache))
    acts = collect(lm, read_split(out / "corpus" / "heldout.jsonl"), sae.hook_name, None)
    check = pairing_activations(out, acts[:5])
    m = sae_metrics({"W_enc_DxS": np.asarray(sae.W_enc_DxS), "b_enc_S": np.asarray(sae.b_enc_S),
                     "W_dec_SxD": np.asarray(sae.W_dec_SxD), "b_dec_D": np.asarray(sae.b_dec_D)}, acts)
    sizes = {p.name: p.stat().st_size for p in sorted((out / "sae").iterdir()) if p.is_file()}
    model_bytes = sum(p.stat().st_size for p in (out / "model").iterdir()
                      if p.is_file() and p.name != "training_report.json")
    result = {"heldout_tokens": m["tokens"], "fve": round(m["fve"], 4), "l0": round(m["l0"], 2),
              "alive_fraction": round(m["alive_fraction"], 4), "pairing_max_abs_diff": check,
              "sae_bytes": sizes, "model_and_tokenizer_bytes": model_bytes,
              "pack_bytes": model_bytes + sum(v for k, v in sizes.items() if k != "training_report.json")}
    log(f"held-out ({m['tokens']:,} tokens): FVE {m['fve']:.3f}  L0 {m['l0']:.1f}  alive "
        f"{m['alive_fraction']:.1%}; pairing check {check:.1e}; pack {result['pack_bytes'] / 1e6:.1f} MB")
    return result


def pairing_activations(out: Path, expect_NxD: np.ndarray) -> float:
    """Max |difference| between the first held-out row's activations as `load_model_with_sae` runs the
    model (the search's path) and as collected here: 0 when the centring conventions agree."""
    from epo_tui.config import Config, ModelConfig, SAEConfig
    from epo_tui.demo.corpus import read_split
    from epo_tui.demo.train_lm import token_stream
    from epo_tui.engine.text_rows import pack_rows
    from epo_tui.engine.pairing import load_model_with_sae

    config = dataclasses.replace(Config(), model=ModelConfig(name=None, path=str(out / "model")),
                                 sae=SAEConfig(path=str(out / "sae")))
    pair = load_model_with_sae(config)
    stream = token_stream(pair.model.tokenizer, read_split(out / "corpus" / "heldout.jsonl"))
    tokens, _ = pack_rows(stream, pair.model.cfg.max_positions, pair.model.tokenizer.bos_token_id)
    _, acts = pair.forward(jnp.asarray(tokens[:1]), logits=False)
    got = np.asarray(acts[0, 1:1 + len(expect_NxD)])
    return float(np.abs(got - expect_NxD).max())
