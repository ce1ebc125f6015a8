"""Seconds per EPO iteration at real model shapes with random weights, on whatever device JAX has:

    python -m epo_tui.bench.shapes --out FILE.json [--iterations N] [--family NAME ...] [--small]

Setups: GPT-2 small's shapes (as `epo-tui bench --model gpt2-small`) at 8 x 16 and 8 x 128, float32 and
bfloat16; and per `--family` (FAMILY_SHAPES: gemma3-1b, llama-1b, pythia-70m), a random transformers model of
that family at its real shapes, saved and loaded through epo-tui's own loader, in bfloat16 at 8 x 128. The
SAE is random arrays (16384 or 24576 latents), so sae-lens is not needed: the module runs where only JAX,
transformers and torch are installed (a GPU box). `--small` shrinks the search for a quick check on a CPU.
Nothing is downloaded; the figures mean nothing about search quality.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from epo_tui.config import Config, ModelConfig, SearchConfig
from epo_tui.bench import speed
from epo_tui.engine.language_model import DTYPES, LanguageModel, load_model
from epo_tui.engine.models.gpt2 import GPT2Config
from epo_tui.engine.pairing import ModelWithSAE
from epo_tui.engine.sae import SAEParams
from epo_tui.engine.tiny import write_tokenizer


def random_sae(d_in: int, d_sae: int, hook: str, seed: int = 0) -> SAEParams:
    """A standard SAE with unit-norm random decoder rows and its transpose as encoder (no sae-lens)."""
    rng = np.random.default_rng(seed)
    w_dec = rng.standard_normal((d_sae, d_in), dtype=np.float32)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    return SAEParams(W_enc_DxS=jnp.asarray(w_dec.T.copy()), b_enc_S=jnp.zeros(d_sae), W_dec_SxD=jnp.asarray(w_dec),
                     b_dec_D=jnp.zeros(d_in), threshold_S=jnp.zeros(d_sae), architecture="standard", k=0,
                     apply_b_dec_to_input=True, normalize_activations="none", hook_name=hook, d_in=d_in,
                     d_sae=d_sae, dtype="float32")


def gpt2_setup(dtype: str, tmp: Path) -> tuple[ModelWithSAE, str]:
    """GPT-2 small's shapes, as `epo-tui bench --model gpt2-small` builds them, with a random SAE."""
    from transformers import AutoTokenizer

    cfg = GPT2Config(**speed.GPT2_SMALL)
    params = jax.tree.map(lambda a: a.astype(DTYPES[dtype]), speed.random_gpt2_params(cfg))
    write_tokenizer(tmp / "tok-gpt2", "gpt2")
    model = LanguageModel(name="gpt2-small shapes", model_type="gpt2", cfg=cfg, params=params,
                          tokenizer=AutoTokenizer.from_pretrained(tmp / "tok-gpt2"), dtype=dtype)
    return ModelWithSAE(model=model, sae=random_sae(768, 24576, "blocks.8.hook_resid_pre")), "gpt2-small shapes"


FAMILY_SHAPES = {  # real shapes, random weights (transformers config kwargs)
    "gemma3-1b": ("Gemma3TextConfig", "gemma", dict(vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                  num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                  sliding_window=512, query_pre_attn_scalar=256, max_position_embeddings=32768), 13),
    "llama-1b": ("LlamaConfig", "llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                 num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                 max_position_embeddings=8192, tie_word_embeddings=True), 8),
    "pythia-70m": ("GPTNeoXConfig", "gpt_neox", dict(vocab_size=50304, hidden_size=512, intermediate_size=2048,
                   num_hidden_layers=6, num_attention_heads=8, rotary_pct=0.25, max_position_embeddings=2048,
                   tie_word_embeddings=False), 3),
}


def family_setup(name: str, dtype: str, tmp: Path) -> tuple[ModelWithSAE, str]:
    """A random transformers model of FAMILY_SHAPES[name], saved and loaded by load_model, with a random
    SAE on the residual after its middle layer."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, tok_family, kwargs, layer = FAMILY_SHAPES[name]
    folder = tmp / name
    if not (folder / "config.json").is_file():
        vocab = write_tokenizer(folder, tok_family)
        config = getattr(transformers, cls_name)(**{**kwargs, "vocab_size": max(vocab, kwargs["vocab_size"]),
                                                   "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2})
        with torch.device("cpu"):
            AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    model = load_model(ModelConfig(name=None, path=str(folder), dtype=dtype))
    sae = random_sae(model.d_model, 16384, f"blocks.{layer}.hook_resid_post")
    return ModelWithSAE(model=model, sae=sae), f"{name} shapes"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m epo_tui.bench.shapes",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--family", action="append", default=[])
    ap.add_argument("--small", action="store_true", help="2 elites x 4 candidates x 4 tokens: a quick check on a CPU")
    args = ap.parse_args(argv)
    results = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
               "jax": jax.__version__, "runs": []}
    with tempfile.TemporaryDirectory(prefix="epo-tui-shapes-") as tmp:
        _run_plans(args, Path(tmp), results)
    return 0


def _run_plans(args: argparse.Namespace, tmp: Path, results: dict) -> None:
    """Each setup in turn; the report is rewritten after each, so a run cut short keeps what it measured."""
    plans = [("gpt2", d, c) for d in ("float32", "bfloat16") for c in (16, 128)]
    plans += [(f, "bfloat16", 128) for f in args.family]
    for kind, dtype, candidates in plans:
        t0 = time.perf_counter()
        pair, desc = gpt2_setup(dtype, tmp) if kind == "gpt2" else family_setup(kind, dtype, tmp)
        search = SearchConfig(candidates=candidates if not args.small else 4, elites=8 if not args.small else 2,
                              prompt_tokens=20 if not args.small else 4)
        setup = speed.Setup(kind, desc, pair, Config(search=search, source="gpu-bench"), speed.SEED_TEXT,
                            time.perf_counter() - t0)
        r = speed.bench_setup(setup, args.iterations, progress=lambda m: print(m, file=sys.stderr, flush=True))
        row = {"setup": kind, "dtype": dtype, "elites": r["search"]["elites"],
               "candidates": r["search"]["candidates"],
               "median_s": r["median_total_s"], "best_s": r["best_total_s"], "mean": r["mean_s"],
               "first_iteration_s": r["first_iteration_s"], "candidates_per_s": r["candidates_per_s"],
               "flops_xla": r["flops_per_iteration"]["xla"].get("total"), "params": r["model"]["params"]}
        print(json.dumps(row), flush=True)
        results["runs"].append(row)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
