"""The `stats` stage: the demo SAE's dataset statistics over the pack's held-out text, shipped in the pack
(`<pack>/dataset/`, a `dataset_stats` store) so `--demo` shows dataset maxima, densities, histograms and top
examples offline. `dataset_stats.load_best_stats` finds them under the demo's SAE key; a user's own
`epo-tui dataset` or `epo-tui import` on the demo replaces them.

    python -m epo_tui.demo.build --stage stats      (after `pack`, which replaces the pack folder)

It is `epo-tui dataset --demo --jsonl <pack>/heldout.jsonl` with settings that keep the files small: rows of
128 tokens as everywhere else (the SAE trained on them; the maxima are the quality benchmark's), the top
TOP_K rows per latent, each stored as WINDOW tokens around its maximum with values to DECIMALS places, and a
coarser histogram (HISTOGRAM: 2 bins per decade from 0.1 to 100, the demo SAE's range). The store keeps
its arrays in float64 (F x bins for the histogram's counts and edges each), so every bin costs 32 kB: about
1 MB in all, 0.3 MB of it the histogram.
"""

from __future__ import annotations

from pathlib import Path

from epo_tui.dataset_stats import SHIPPED_FOLDER

TOP_K = 2
WINDOW = (7, 2)  # tokens before and after each example's maximum
DECIMALS = 2
HISTOGRAM = (0.1, 100.0, 2)  # (low, high, bins per decade): (0, 0.1), then 6 bins to 100 and past it


def build_heldout_stats(pack: Path, log=print) -> dict:
    """Writes <pack>/dataset/ from <pack>/heldout.jsonl with the pack's model and SAE; returns the pass's summary."""
    from epo_tui.config import load_config
    from epo_tui.dataset_text import JSONL, TextSource
    from epo_tui.engine.dataset_job import DatasetOptions, run_dataset, summary_line

    config = load_config(str(pack / "config.toml"))
    options = DatasetOptions(sources=(TextSource(pack / "heldout.jsonl", JSONL),), top_k=TOP_K,
                             store=pack / SHIPPED_FOLDER, example_window=WINDOW, decimals=DECIMALS,
                             histogram=HISTOGRAM)
    outcome = run_dataset(config, options)
    for path in (pack / SHIPPED_FOLDER).iterdir():
        path.chmod(0o644)  # the pack is read by every user, whatever the umask of whoever built it
    (pack / SHIPPED_FOLDER).chmod(0o755)
    size = sum(p.stat().st_size for p in (pack / SHIPPED_FOLDER).iterdir())
    log(f"stats: {summary_line(outcome)}; {size / 1e3:.0f} kB")
    return outcome.summary
