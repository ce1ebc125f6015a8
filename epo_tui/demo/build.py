"""Builds the offline demo pack, stage by stage.

    python -m epo_tui.demo.build [--out DIR] [--stage corpus|lm|eval-lm|sae|eval-sae|labels|pack|stats|all]

corpus   English prose from Debian documentation packages -> DIR/corpus/{train,heldout}.jsonl
lm       byte-level BPE tokenizer + a small GPT-2 trained in JAX -> DIR/model (needs the corpus)
eval-lm  held-out cross-entropy of DIR/model vs a unigram baseline, and logit parity with transformers
sae      activations of blocks.2.hook_resid_pre over train -> a standard ReLU SAE -> DIR/sae (needs the lm)
eval-sae held-out FVE, L0 and alive fraction of DIR/sae (as the search loads and runs it)
labels   a label per latent of DIR/sae from its top-activating train snippets -> DIR/labels (needs the sae)
pack     DIR's model, SAE, labels and held-out sample + config.toml + NOTICE.md -> epo_tui/demo/pack
stats    the pack SAE's dataset statistics over the pack's held-out text -> <pack>/dataset (heldout_stats.py)
all      corpus, lm, sae, labels, pack, stats (lm ends with eval-lm, sae with eval-sae)

Seeds are fixed; see epo_tui/demo/README.md for run times and the numbers to expect.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path("/tmp/epo_tui_demo_build")
STAGES = ("corpus", "lm", "eval-lm", "sae", "eval-sae", "labels", "pack", "stats", "all")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epo_tui.demo.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"build folder (default {DEFAULT_OUT})")
    parser.add_argument("--stage", choices=STAGES, default="all")
    parser.add_argument("--steps", type=int, default=None, help="LM training steps (default: the spec's)")
    parser.add_argument("--sae-steps", type=int, default=None, help="SAE training steps (default: the spec's)")
    parser.add_argument("--l1", type=float, default=None, help="SAE l1 coefficient (default: the spec's)")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get install missing sources")
    parser.add_argument("--pack-dir", type=Path, default=None,
                        help="where the pack stage writes (default: epo_tui/demo/pack in this package)")
    args = parser.parse_args(argv)

    from epo_tui.demo.corpus import CorpusError, build_corpus
    from epo_tui.demo.pack import PackError
    from epo_tui.errors import UserError

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    try:
        if args.stage in ("corpus", "all"):
            t = time.perf_counter()
            manifest = build_corpus(out / "corpus", install=not args.no_install)
            timings["corpus"] = time.perf_counter() - t
            for split in ("train", "heldout"):
                s = manifest[split]
                print(f"corpus {split}: {s['documents']} documents, {s['paragraphs']} paragraphs, "
                      f"{s['bytes']:,} bytes, {s['words']:,} words")
        if args.stage in ("lm", "all", "eval-lm", "sae", "eval-sae", "labels"):
            for name in ("train.jsonl", "heldout.jsonl"):
                if not (out / "corpus" / name).is_file():
                    raise CorpusError(f"{out / 'corpus' / name} is missing: run --stage corpus first")
        if args.stage in ("lm", "all"):
            from dataclasses import replace

            from epo_tui.demo.train_lm import LMSpec, build_lm

            spec = LMSpec() if args.steps is None else replace(LMSpec(), steps=args.steps)
            t = time.perf_counter()
            build_lm(out / "corpus", out, spec)
            timings["lm"] = time.perf_counter() - t
        if args.stage == "eval-lm":
            from epo_tui.demo.train_lm import eval_lm

            if not (out / "model" / "model.safetensors").is_file():
                raise CorpusError(f"{out / 'model'} holds no model: run --stage lm first")
            t = time.perf_counter()
            eval_lm(out)
            timings["eval-lm"] = time.perf_counter() - t
        if args.stage in ("sae", "all"):
            from dataclasses import replace

            from epo_tui.demo.train_sae import SAESpec, build_sae

            if not (out / "model" / "model.safetensors").is_file():
                raise CorpusError(f"{out / 'model'} holds no model: run --stage lm first")
            spec = SAESpec()
            if args.sae_steps is not None:
                spec = replace(spec, steps=args.sae_steps)
            if args.l1 is not None:
                spec = replace(spec, l1_coefficient=args.l1)
            t = time.perf_counter()
            build_sae(out, spec)
            timings["sae"] = time.perf_counter() - t
        if args.stage == "eval-sae":
            from epo_tui.demo.train_sae import eval_sae

            if not (out / "sae" / "sae_weights.safetensors").is_file():
                raise CorpusError(f"{out / 'sae'} holds no SAE: run --stage sae first")
            t = time.perf_counter()
            eval_sae(out)
            timings["eval-sae"] = time.perf_counter() - t
        if args.stage in ("labels", "all"):
            from epo_tui.demo.labels import build_labels

            if not (out / "sae" / "sae_weights.safetensors").is_file():
                raise CorpusError(f"{out / 'sae'} holds no SAE: run --stage sae first")
            t = time.perf_counter()
            build_labels(out)
            timings["labels"] = time.perf_counter() - t
        if args.stage in ("pack", "all"):
            from epo_tui import paths
            from epo_tui.demo.pack import build_pack

            t = time.perf_counter()
            build_pack(out, args.pack_dir or paths.demo_pack())
            timings["pack"] = time.perf_counter() - t
        if args.stage in ("stats", "all"):
            from epo_tui import paths
            from epo_tui.demo.heldout_stats import build_heldout_stats

            pack = args.pack_dir or paths.demo_pack()
            if not (pack / "config.toml").is_file():
                raise CorpusError(f"{pack} holds no pack: run --stage pack first")
            t = time.perf_counter()
            build_heldout_stats(pack)
            timings["stats"] = time.perf_counter() - t
    except (CorpusError, PackError, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for stage, seconds in timings.items():
        print(f"stage {stage}: {seconds:.0f}s")
    log = out / "build_times.json"
    previous = json.loads(log.read_text()) if log.is_file() else {}
    log.write_text(json.dumps({**previous, **{k: round(v, 1) for k, v in timings.items()}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
