"""One `epo-tui dataset` run: a dataset pass (engine/dataset_pass.py) that survives being stopped, and whose
result is cached.

The pass's key is the sha256 of what changes its result: the model (name, dtype), the SAE (release, id or
folder), the text (each file's kind and the sha256 of its bytes, in order) and the options (context, top-k,
the token cap, the histogram's bins, and how examples are stored). Its cache folder,
<cache>/dataset/<key[:16]>/, holds:
  - `checkpoint.safetensors`: the pass so far (`PassState`'s arrays; its metadata: the key, rows done of
    rows in all, tokens counted), written atomically every few batches, on Ctrl-C or SIGTERM, and at the
    end. A run killed outright (SIGKILL, power) loses the batches since the last one; rerunning the same
    command continues from it and ends with the same statistics as an uninterrupted run (the same rows in
    the same batches).
  - `summary.jsonl`: one JSON line once the statistics are in their store. A rerun then prints it
    without loading the model; when the store was since replaced (a pass over other text, an import),
    the statistics are written again from the final checkpoint (the text is tokenized again, nothing
    runs through the model).
The statistics go into the SAE's local store (`dataset_stats.stats_folder(key, LOCAL)`), or `store`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from epo_tui import dataset_stats, paths
from epo_tui.atomic import write_bytes_atomic, write_text_atomic
from epo_tui.dataset_text import TextSource, check_sources, fingerprint, has_text, pieces
from epo_tui.engine import dataset_pass
from epo_tui.engine.dataset_pass import DatasetPass, PassState
from epo_tui.engine.runner import StopFlag
from epo_tui.errors import UserError

FORMAT = "1"
CHECKPOINT_FILE = "checkpoint.safetensors"
SUMMARY_FILE = "summary.jsonl"
CHECKPOINT_SECONDS = 30.0  # a checkpoint at least this often (and at the end, and when stopped)


@dataclass(frozen=True)
class DatasetOptions:
    """What one run reads and keeps. `max_tokens`: the cap on stream tokens (None: all the text);
    `checkpoint_batches`: a checkpoint every this many batches as well as every CHECKPOINT_SECONDS (None:
    by time alone); `store`: the folder the statistics go to (None: the SAE's local store);
    `example_window` (before, after) and `decimals`: stored examples trimmed around their maximum and
    values rounded (the demo pack keeps its files small; None: whole rows, full precision);
    `histogram`: (low, high, bins per decade) of `dataset_pass.histogram_edges`."""

    sources: tuple[TextSource, ...]
    context: int = dataset_pass.DEFAULT_CONTEXT
    top_k: int = dataset_pass.DEFAULT_TOP_K
    max_tokens: int | None = None
    batch_rows: int = dataset_pass.DEFAULT_BATCH_ROWS
    checkpoint_batches: int | None = None
    store: Path | None = None
    example_window: tuple[int, int] | None = None
    decimals: int | None = None
    histogram: tuple[float, float, int] = (dataset_pass.HISTOGRAM_LOW, dataset_pass.HISTOGRAM_HIGH,
                                           dataset_pass.BINS_PER_DECADE)

    def check(self) -> None:
        """UserError (one line) for an option out of range."""
        for option, value in (("--context", self.context), ("--top-k", self.top_k), ("--tokens", self.max_tokens),
                              ("--batch-size", self.batch_rows), ("--checkpoint-every", self.checkpoint_batches)):
            if value is not None and value < 1:
                raise UserError(f"{option}: must be >= 1, found {value}")
        if self.context < 2:
            raise UserError(f"--context: must be >= 2 (BOS and a token), found {self.context}")


@dataclass
class RunOutcome:
    """`summary`: the summary line's record; `cached`: nothing ran (the result was already there);
    `interrupted`: stopped before the end (the checkpoint holds the rows done)."""

    summary: dict
    cached: bool = False
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)


def run_key(config, options: DatasetOptions, text: list[dict]) -> str:
    """The hex sha256 naming this pass (see the module docstring)."""
    from epo_tui.engine.language_model import resolve_dtype

    what = {"format": FORMAT, "model": config.model.path or config.model.name,
            "dtype": resolve_dtype(config.model.dtype),
            "sae": {"release": config.sae.release, "id": config.sae.id, "path": config.sae.path},
            "text": [{"kind": t["kind"], "sha256": t["sha256"]} for t in text],
            "context": options.context, "top_k": options.top_k, "max_tokens": options.max_tokens,
            "histogram": list(options.histogram),
            "example_window": list(options.example_window) if options.example_window else None,
            "decimals": options.decimals, "store": str(options.store) if options.store else None}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def cache_folder(key: str) -> Path:
    return paths.cache_dir() / "dataset" / key[:16]


def cached_summary(key: str) -> dict | None:
    """The finished run's summary when its statistics are still the ones in their store, else None."""
    path = cache_folder(key) / SUMMARY_FILE
    try:
        summary = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
        stats = dataset_stats.load_stats(Path(summary["store"]))
    except (OSError, ValueError, KeyError, IndexError, TypeError, UserError):
        return None
    return summary if stats is not None and stats.provenance.get("run") == key else None


def run_dataset(config, options: DatasetOptions, display=None, stop: StopFlag | None = None) -> RunOutcome:
    """The run (see the module docstring), reporting to `display` (progress.DatasetProgress or None).
    UserError for bad options or text; the model and SAE load only when something is left to do."""
    options.check()
    check_sources(options.sources)
    # the text is read through before anything loads: a bad line is one quick error
    if not has_text(options.sources):
        raise UserError("dataset: the text is empty")
    text = fingerprint(options.sources)
    key = run_key(config, options, text)
    summary = cached_summary(key)
    if summary is not None:
        return RunOutcome(summary, cached=True)
    from epo_tui.engine.pairing import load_model_with_sae

    pair = load_model_with_sae(config)
    rows = dataset_pass.dataset_rows(pair, pieces(options.sources), options.context, options.max_tokens)
    job = DatasetPass(pair, rows, options.batch_rows, options.histogram)
    folder = cache_folder(key)
    state, seconds_before, notes = _resume(folder / CHECKPOINT_FILE, key, job, options.top_k)
    stop = stop or StopFlag()
    started = time.perf_counter()
    saver = _Checkpoints(folder / CHECKPOINT_FILE, key, rows.rows, options.checkpoint_batches,
                         lambda: seconds_before + time.perf_counter() - started)
    first_row = state.rows_done
    if display is not None:
        display.start(rows.rows, rows.text_tokens, state.rows_done, int(rows.text_RxC[:state.rows_done].sum()))
        for note in notes:
            display.line(note)

    def on_batch(new_state: PassState, read: int, seconds: float) -> None:
        saver.maybe(new_state)
        if display is not None:
            display.advance(new_state.rows_done, read, seconds)

    with _stop_on_sigterm(stop):
        state = job.run(state, lambda: stop.requested, on_batch)
    saver.save(state)
    seconds = time.perf_counter() - started
    read = int(rows.text_RxC[first_row:state.rows_done].sum())  # by this run (the rate is this run's)
    if state.rows_done < rows.rows:
        return RunOutcome({"rows_done": state.rows_done, "rows": rows.rows, "cache": str(folder),
                           "seconds": seconds, "text_tokens_read": read}, interrupted=True, notes=notes)
    store = options.store or dataset_stats.stats_folder(dataset_stats.sae_key(pair.model.name, pair.sae.display_name),
                                                         dataset_stats.LOCAL)
    summary = _summary(pair, rows, state, options, text, key, store, seconds_before + seconds,
                       read / seconds if seconds > 0 and read else None)
    write_stats(pair, rows, state, job.edges_E, options, store, summary)
    write_text_atomic(folder / SUMMARY_FILE, json.dumps(summary, ensure_ascii=False) + "\n")
    return RunOutcome(summary, notes=notes)


def _summary(pair, rows, state: PassState, options: DatasetOptions, text: list[dict], key: str, store: Path,
             seconds: float, tokens_per_second: float | None) -> dict:
    fired = int(np.count_nonzero(state.fires_F))
    return {"run": key, "store": str(store), "sae_key": dataset_stats.sae_key(pair.model.name, pair.sae.display_name),
            "model": pair.model.name, "sae": pair.sae.display_name, "hook": pair.sae.hook_name,
            "files": text, "documents": rows.documents, "text_tokens": rows.text_tokens, "rows": rows.rows,
            "context": rows.context, "tokens_counted": state.tokens_counted, "latents": int(pair.sae.d_sae),
            "latents_firing": fired, "examples": int(np.count_nonzero(np.asarray(state.top_row_FxK) >= 0)),
            "top_k": options.top_k, "seconds": round(seconds, 3),
            "tokens_per_second": round(tokens_per_second, 1) if tokens_per_second else None,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_stats(pair, rows, state: PassState, edges_E: np.ndarray, options: DatasetOptions, store: Path,
                summary: dict) -> None:
    """The finished pass into the store at `store` (dataset_stats.write_stats, atomically)."""
    provenance = {"origin": dataset_stats.LOCAL, "run": summary["run"], "sae_key": summary["sae_key"],
                  "text": ", ".join(t["name"] for t in summary["files"]),
                  "tokens": str(summary["tokens_counted"]), "rows": f"{rows.rows} x {rows.context}",
                  "top_k": str(options.top_k),
                  "histogram": "counts of activations > 0; log-spaced bins, {2} per decade from {0:g} to {1:g}, "
                               "the first bin (0, {0:g})".format(*options.histogram),
                  "written": summary["finished"]}
    examples = dataset_pass.latent_examples(pair, rows, state, options.example_window, options.decimals)
    dataset_stats.write_stats(store, dataset_pass.maxima(state), dataset_pass.density(state), examples,
                              dataset_pass.stored_histogram(state, edges_E), provenance)


def _resume(path: Path, key: str, job: DatasetPass, top_k: int) -> tuple[PassState, float, list[str]]:
    """(state, seconds the pass has run so far, notes): the checkpoint's when it is this pass's, else an
    empty state (and a note why)."""
    empty = job.empty_state(top_k)
    if not path.is_file():
        return empty, 0.0, []
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            meta = handle.metadata() or {}
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}
        if meta.get("run") != key or int(meta["rows"]) != job.rows.rows:
            return empty, 0.0, [f"{path}: a checkpoint of another pass; starting over"]
        state = PassState.from_arrays(int(meta["rows_done"]), int(meta["tokens_counted"]), arrays)
        seconds = float(meta.get("seconds", 0.0))
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        return empty, 0.0, [f"{path}: damaged checkpoint ({err}); starting over"]
    if not state.fits(job.pair.sae.d_sae, top_k, job.rows.context, job.bins):
        return empty, 0.0, [f"{path}: a checkpoint of other sizes; starting over"]
    return state, seconds, [f"resuming from row {state.rows_done:,} of {job.rows.rows:,} (checkpoint {path})"]


class _Checkpoints:
    """Saves the state atomically every `every_batches` batches (None: by time alone) or CHECKPOINT_SECONDS."""

    def __init__(self, path: Path, key: str, rows: int, every_batches: int | None, seconds):
        self.path, self.key, self.rows, self.every, self.seconds = path, key, rows, every_batches, seconds
        self.batches, self.last = 0, time.monotonic()

    def maybe(self, state: PassState) -> None:
        self.batches += 1
        if (self.every is not None and self.batches >= self.every
                or time.monotonic() - self.last >= CHECKPOINT_SECONDS):
            self.save(state)

    def save(self, state: PassState) -> None:
        from safetensors.numpy import save

        meta = {"format": FORMAT, "run": self.key, "rows": str(self.rows), "rows_done": str(state.rows_done),
                "tokens_counted": str(state.tokens_counted), "seconds": repr(self.seconds())}
        write_bytes_atomic(self.path, save(state.arrays(), metadata=meta))
        self.batches, self.last = 0, time.monotonic()


@contextlib.contextmanager
def _stop_on_sigterm(stop: StopFlag):
    """SIGTERM asks the pass to stop after its batch, as the first Ctrl-C does (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.request())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def summary_line(outcome: RunOutcome) -> str:
    """What the command prints on stdout at its end (one line)."""
    s = outcome.summary
    if outcome.interrupted:
        return (f"stopped after row {s['rows_done']:,} of {s['rows']:,} (checkpoint in {s['cache']}); run the same "
                f"command again to continue")
    rate = f", {s['tokens_per_second']:,.0f} tokens/s" if s.get("tokens_per_second") and not outcome.cached else ""
    head = "already computed, not run again: " if outcome.cached else ""
    return (f"{head}dataset statistics of {s['latents']:,} latents ({s['latents_firing']:,} fire) over "
            f"{s['tokens_counted']:,} tokens in {s['rows']:,} rows of {s['context']}, {s['examples']:,} examples "
            f"(top {s['top_k']}); {s['seconds']:.1f} s{rate}; in {s['store']}")

