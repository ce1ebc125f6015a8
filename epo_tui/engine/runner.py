"""The headless search loop (`epo-tui run`) and the batch loop (`epo-tui batch`).

Both stop cleanly between iterations on Ctrl-C (SIGINT sets a flag; a KeyboardInterrupt out of a step
keeps the last finished state) and still write their results. Progress goes to a `Reporter`: rich
bars in the CLI, protocol events in the worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
from jax.sharding import Mesh

from epo_tui import results
from epo_tui.config import Config
from epo_tui.engine.distributed import Cluster, gather_summaries, rows_per_process
from epo_tui.engine.pairing import ModelWithSAE
from epo_tui.engine.search import Search, SearchState, elite_reports, local_mesh


class Reporter:
    """Callbacks of a run or batch; each does nothing unless overridden."""

    def batch_started(self, features: list[int]) -> None:
        """The features this process will run, in order."""

    def search_started(self, label: str, iterations: int) -> None:
        """A search is set up (model on the devices, starting elites not yet sampled)."""

    def iteration_done(self, state: SearchState, seconds: float) -> None:
        """One more iteration finished (state.iteration counts them)."""

    def search_finished(self, result: dict, folder: Path) -> None:
        """result.json and report.md are written in `folder`."""


class StopFlag:
    """Ctrl-C asks the loops to stop between iterations; a second Ctrl-C interrupts at once.

    Use as a context manager: it installs its SIGINT handler only in the main thread (Python allows
    signal handlers nowhere else), and restores the previous one on exit.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def request(self) -> None:
        self.requested = True

    def _on_sigint(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        # os.write, not print: a handler may run in the middle of another write to sys.stderr
        with contextlib.suppress(OSError):
            os.write(2, b"\nepo-tui: stopping after this iteration (Ctrl-C again to stop at once)\n")

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


# ----------------------------------------------------------------------------------------------
# One search


def run_search(search: Search, iterations: int, reporter: Reporter, stop: StopFlag
               ) -> tuple[SearchState, results.RunTimings]:
    """Starting elites, then up to `iterations` steps; stops early (interrupted) on Ctrl-C."""
    timings = results.RunTimings(iterations_requested=iterations)
    start = time.perf_counter()
    state = search.initial_state()
    timings.setup_s = time.perf_counter() - start
    try:
        while timings.iterations_run < iterations and not stop.requested:
            t0 = time.perf_counter()
            state, _ = search.step(state)
            timings.iteration_s.append(time.perf_counter() - t0)
            reporter.iteration_done(state, timings.iteration_s[-1])
    except KeyboardInterrupt:  # mid-iteration: the state before it is complete, so keep that
        stop.request()
    timings.interrupted = timings.iterations_run < iterations
    return state, timings


def result_of(search: Search, state: SearchState, timings: results.RunTimings, cluster: Cluster) -> dict:
    """The result.json content of a search in the state it reached."""
    model, sae, feature = search.pair.model, search.pair.sae, search.config.feature

    feature_record = {"kind": feature.kind, "indices": [int(i) for i in np.asarray(search.arrays.indices_F)],
                      "combine": feature.combine, "lp_p": feature.lp_p, "lp_offset": feature.lp_offset,
                      "read": feature.read, "hook": search.target.hook}
    return results.build_result(
        config=search.config.to_dict(), feature=feature_record, model=model.name,
        sae={"name": sae.display_name, "hook": sae.hook_name}, timings=timings,
        frontier=state.frontier.to_json(model.decode), best_objective_history=state.best_objective_history,
        elites=elite_reports(search, state), process=cluster.to_json())


def features_label(config: Config) -> str:
    features = config.feature.features
    return f"feature {features[0]}" if len(features) == 1 else f"features {'+'.join(map(str, features))}"


def run_one(pair: ModelWithSAE, config: Config, folder: Path, reporter: Reporter, stop: StopFlag,
            mesh: Mesh | None = None, cluster: Cluster = Cluster()) -> dict:
    """One search for config.feature: runs it, writes folder/result.json and report.md, returns the result."""
    search = Search(pair, config, mesh=mesh or local_mesh())
    reporter.search_started(features_label(config), config.search.iterations)
    state, timings = run_search(search, config.search.iterations, reporter, stop)
    result = result_of(search, state, timings, cluster)
    results.write_result(folder, result)
    reporter.search_finished(result, Path(folder))
    return result


# ----------------------------------------------------------------------------------------------
# A batch: one search per feature, then an index over them


def feature_folder(feature: int) -> str:
    return f"feature-{feature}"


def run_batch(pair: ModelWithSAE, config: Config, features: list[int], out: Path, reporter: Reporter,
              stop: StopFlag, cluster: Cluster = Cluster(), mesh: Mesh | None = None) -> dict:
    """This process's share of `features`, each in out/feature-N/; then the summaries of all processes
    are gathered and process 0 writes out/index.json and index.md. Returns the index (every process
    gets it; only process 0 writes it)."""
    mine = cluster.share(features)
    mesh = mesh or local_mesh()  # this host's devices: each process searches on its own
    reporter.batch_started(mine)
    summaries, interrupted = [], False
    try:
        for feature in mine:
            if stop.requested:
                interrupted = True
                break
            one = dataclasses.replace(config, feature=dataclasses.replace(config.feature, index=feature, indices=()))
            result = run_one(pair, one, out / feature_folder(feature), reporter, stop, mesh, cluster)
            summaries.append(results.summary(result, feature_folder(feature)))
            if result["timings"]["interrupted"]:
                interrupted = True
                break
    except KeyboardInterrupt:  # a second Ctrl-C: still index what finished
        interrupted = True
    gathered = gather_summaries(summaries, cluster, rows_per_process(len(features), cluster),
                                config.search.prompt_tokens)
    index = _index(pair, gathered, features, interrupted or len(gathered) < len(features), cluster)
    if cluster.is_leader:
        results.write_index(out, index)
    return index


def _index(pair: ModelWithSAE, gathered: list[dict], features: list[int], interrupted: bool,
           cluster: Cluster) -> dict:
    for entry in gathered:  # prompts travel as ids between processes; the text is decoded here
        entry["prompt"] = pair.model.decode(entry["token_ids"])
        entry["folder"] = feature_folder(entry["feature"])
    return results.build_index(gathered, model=pair.model.name,
                               sae={"name": pair.sae.display_name, "hook": pair.sae.hook_name},
                               features_requested=features, interrupted=interrupted, process=cluster.to_json())


def random_features(count: int, d_sae: int, seed: int) -> list[int]:
    """`count` distinct latents drawn uniformly from range(d_sae) by numpy's RNG seeded with `seed`."""
    return sorted(int(i) for i in np.random.default_rng(seed).choice(d_sae, size=count, replace=False))
