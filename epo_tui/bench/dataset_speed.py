"""How long `epo-tui dataset` takes at GPT-2-small shapes, extrapolated from a few hundred rows:

    python -m epo_tui.bench.dataset_speed [--rows 256] [--batch-size 16] [--top-k 20] [--context 128] [--json]

The model and SAE are `epo-tui bench --model gpt2-small`'s (bench/speed.py: GPT-2 small's shapes with random
weights, a random 24,576-latent SAE on blocks.8.hook_resid_pre; nothing downloaded); the text is the demo
pack's held-out sample in that model's tokenizer. It times the pass (engine/dataset_pass.py) batch by batch,
the first batch (which compiles) apart, one checkpoint save (the F x K x C state, as the command writes it),
and writing the store's examples for the rows run; then scales the steady rate to the seed's own
statistics, 24,576 rows of 128 tokens. The figures are the machine's, not the model's: random weights run
exactly as fast as trained ones.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from epo_tui.bench.report import load_average
from epo_tui.bench.report import machine as machine_basics

SEED_ROWS = 24_576  # the seed's statistics: 24,576 rows of 128 tokens


def run(rows: int, batch_rows: int, top_k: int, context: int, progress=print) -> dict:
    import jax
    from safetensors.numpy import save

    from epo_tui import paths
    from epo_tui.bench.speed import gpt2_small_setup
    from epo_tui.dataset_text import JSONL, TextSource, pieces
    from epo_tui.engine import dataset_pass

    machine = {**machine_basics(), "devices": [str(d) for d in jax.devices()]}
    pair, description = gpt2_small_setup()
    progress(f"dataset pass at {description}")
    heldout = [TextSource(paths.demo_pack() / "heldout.jsonl", JSONL)]
    data = dataset_pass.dataset_rows(pair, pieces(heldout), context, max_tokens=rows * (context - 1))
    job = dataset_pass.DatasetPass(pair, data, batch_rows)
    seconds: list[float] = []

    def on_batch(state, read, batch_seconds):
        seconds.append(batch_seconds)
        if len(seconds) == 1 or len(seconds) % 4 == 0:
            progress(f"batch {len(seconds)}: {state.rows_done}/{data.rows} rows, {batch_seconds:.2f} s")

    state = job.run(job.empty_state(top_k), on_batch=on_batch)
    steady = seconds[1:]
    per_row = sum(steady) / (len(steady) * job.batch_rows)
    t0 = time.perf_counter()
    checkpoint = save(state.arrays(), metadata={"rows_done": str(state.rows_done)})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "checkpoint.safetensors").write_bytes(checkpoint)
        checkpoint_s = time.perf_counter() - t0
        t0 = time.perf_counter()  # the store's examples.jsonl lines (written here to memory, without fsync)
        buffer = io.StringIO()
        examples = 0
        for index, kept in dataset_pass.latent_examples(pair, data, state):
            buffer.write(json.dumps({"index": index, "examples": [e.to_json() for e in kept]}) + "\n")
            examples += len(kept)
        examples_s = time.perf_counter() - t0
    row_tokens = context - 1
    report = {
        "setup": description, "machine": machine, "rows": data.rows, "context": context, "batch_rows": job.batch_rows,
        "top_k": top_k, "latents": int(pair.sae.d_sae), "first_batch_s": seconds[0],
        "steady_batch_s": float(np.mean(steady)), "steady_batches": len(steady),
        "tokens_per_s": row_tokens / per_row, "rows_per_s": 1 / per_row,
        "checkpoint_bytes": len(checkpoint), "checkpoint_s": checkpoint_s,
        "examples_written": examples, "examples_s": examples_s, "examples_bytes": len(buffer.getvalue()),
        "seed_rows": SEED_ROWS,
        "seed_pass_s_extrapolated": seconds[0] + SEED_ROWS * per_row,
        "load_average_end": load_average(),
    }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epo_tui.bench.dataset_speed", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--json", action="store_true", help="the report as one JSON line on stdout")
    args = parser.parse_args(argv)
    report = run(args.rows, args.batch_size, args.top_k, args.context,
                 progress=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(report))
        return 0
    hours = report["seed_pass_s_extrapolated"] / 3600
    print(f"{report['setup']}\n{report['rows']} rows of {report['context']} in batches of {report['batch_rows']}: "
          f"first batch {report['first_batch_s']:.1f} s (compiles), then {report['steady_batch_s']:.2f} s a batch: "
          f"{report['tokens_per_s']:,.0f} tokens/s, {report['rows_per_s']:.1f} rows/s\n"
          f"checkpoint {report['checkpoint_bytes'] / 1e6:.0f} MB in {report['checkpoint_s']:.2f} s; "
          f"{report['examples_written']:,} examples ({report['examples_bytes'] / 1e6:.1f} MB) in "
          f"{report['examples_s']:.1f} s\n"
          f"extrapolated to the seed's {SEED_ROWS:,} rows: {report['seed_pass_s_extrapolated']:,.0f} s ({hours:.2f} h) "
          f"for the pass; load average {report['machine']['load_average']} at start, "
          f"{report['load_average_end']} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
