"""The headless search loop (`epo-tui run`) and the batch loop (`epo-tui batch`).

Both stop cleanly between iterations on Ctrl-C (SIGINT sets a flag; a KeyboardInterrupt out of a step
keeps the last finished state) or once `search.time_budget` has run out, and still write their
results. Progress goes to a `Reporter`: rich bars in the CLI, protocol events in the worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
from jax.sharding import Mesh

from epo_tui import dataset_stats, results, sessions
from epo_tui.budget import Deadline, budget_seconds, format_budget
from epo_tui.config import Config
from epo_tui.engine.distributed import Cluster, gather_summaries, rows_per_process
from epo_tui.engine.pairing import ModelWithSAE
from epo_tui.engine.reporting import features_label
from epo_tui.engine.search import Search, SearchState, Timings
from epo_tui.engine.session_search import RecordedSearch
from epo_tui.errors import UserError
from epo_tui.text import inert


class Reporter:
    """Callbacks of a run or batch; each does nothing unless overridden."""

    def batch_started(self, features: list[int]) -> None:
        """The features this process will run, in order."""

    def batch_skipped(self, features: list[int], out: Path) -> None:
        """Features of this process that an earlier run of the batch finished in `out` (not run again)."""

    def search_started(self, label: str, iterations: int, deadline: Deadline | None = None,
                       penalty_scale: str = "") -> None:
        """A search is set up (model on the devices, starting elites not yet sampled); `deadline`: its
        time budget, when it has one; `penalty_scale`: what λ means in it (ObjectiveScale.describe())."""

    def elites_ready(self, state: SearchState, texts: list[str]) -> None:
        """The elites a search starts (or resumes) from exist, before its first iteration (which
        compiles); `texts` are their prompts."""

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


class PlainSearch:
    """A search without a session (benchmarks): the same stepping interface as RecordedSearch.
    `seed_text`: what the starting elites are sampled after (Search.initial_state); `last_timings`: the
    seconds of each step of the last iteration."""

    def __init__(self, search: Search, iterations: int, seed_text: str | None = None):
        self.search, self.iterations_total = search, iterations
        self.state = search.initial_state(seed_text)
        self.last_timings: Timings | None = None

    @property
    def done(self) -> bool:
        return self.state.iteration >= self.iterations_total

    def step(self) -> None:
        self.state, self.last_timings = self.search.step(self.state)


def run_search(stepper, reporter: Reporter, stop: StopFlag, deadline: Deadline | None = None) -> results.RunTimings:
    """Steps until done; stops early on Ctrl-C (interrupted) or once `deadline` has passed (the budget
    ran out: not interrupted). `stepper` is a PlainSearch or a RecordedSearch (already set up: its
    set-up time is the caller's to record)."""
    start_iteration = stepper.state.iteration
    timings = results.RunTimings(iterations_requested=stepper.iterations_total - start_iteration,
                                 time_budget_s=deadline.seconds if deadline else None)
    try:
        while not stepper.done and not stop.requested:
            if deadline is not None and deadline.expired:
                timings.budget_ran_out = True
                break
            t0 = time.perf_counter()
            stepper.step()
            timings.iteration_s.append(time.perf_counter() - t0)
            reporter.iteration_done(stepper.state, timings.iteration_s[-1])
    except KeyboardInterrupt:  # mid-iteration: the state before it is complete, so keep that
        stop.request()
    timings.interrupted = not stepper.done and not timings.budget_ran_out
    return timings


def make_results_folder(folder: Path) -> None:
    """Makes `folder` once a search is set up (nothing is written for a search that cannot start), before
    it runs: a path that cannot be a folder is one line now, not an error after the search."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot make the results folder {inert(str(folder))}: {err.strerror or err}") from None


def run_one(pair: ModelWithSAE, config: Config, folder: Path, reporter: Reporter, stop: StopFlag,
            mesh: Mesh | None = None, cluster: Cluster = Cluster(), sessions_root: Path | None = None) -> dict:
    """One search for config.feature, recorded as a session: runs it, writes folder/result.json and
    report.md (and the same in the session folder), returns the result."""
    t0 = time.perf_counter()
    deadline = Deadline(budget_seconds(config.search.time_budget))  # set-up counts too
    search = Search(pair, config, mesh=mesh)  # its input errors come before any output
    make_results_folder(folder)
    reporter.search_started(features_label(config), config.search.iterations, deadline,
                            search.objective_scale.describe())
    recorded = RecordedSearch.start(pair, config, search=search, root=sessions_root)
    return _run_recorded(recorded, time.perf_counter() - t0, folder, reporter, stop, cluster, deadline)


def resume_one(pair: ModelWithSAE, session: sessions.Session, folder: Path, reporter: Reporter, stop: StopFlag,
               iterations_total: int | None = None, mesh: Mesh | None = None, time_budget: str | None = None) -> dict:
    """A stopped session continued exactly where its last checkpoint left it, with a fresh time budget:
    `time_budget`, else the session's own search.time_budget."""
    t0 = time.perf_counter()
    deadline = Deadline(None)  # set-up counts too
    recorded = RecordedSearch.resume(pair, session, mesh=mesh, iterations_total=iterations_total)
    make_results_folder(folder)
    own = recorded.search.config.search.time_budget
    deadline.seconds = budget_seconds(own if time_budget is None else time_budget)
    reporter.search_started(features_label(recorded.search.config), recorded.iterations_total, deadline,
                            recorded.search.objective_scale.describe())
    return _run_recorded(recorded, time.perf_counter() - t0, folder, reporter, stop, Cluster(), deadline)


def _run_recorded(recorded: RecordedSearch, setup_s: float, folder: Path, reporter: Reporter, stop: StopFlag,
                  cluster: Cluster, deadline: Deadline | None = None) -> dict:
    model = recorded.search.pair.model
    reporter.elites_ready(recorded.state, [model.decode(row) for row in recorded.state.tokens_KxN])
    try:
        timings = run_search(recorded, reporter, stop, deadline)
    except sessions.SessionGone as err:
        _lost_session(recorded, err, folder, cluster)
    except BaseException as err:  # a crash (a full disk too) still leaves the last iterations checkpointed
        recorded.abandon(f"{type(err).__name__}: {err}")
        raise
    timings.setup_s = setup_s
    try:
        result = recorded.finish("finished" if recorded.done else "stopped", timings=timings, cluster=cluster)
    except sessions.SessionGone as err:
        _lost_session(recorded, err, folder, cluster, timings)
    result = results.with_dataset(result, _dataset_stats(recorded.search.pair, reporter))
    results.write_result(folder, result)
    reporter.search_finished(result, Path(folder))
    return result


def _dataset_stats(pair: ModelWithSAE, reporter: Reporter) -> dataset_stats.DatasetStats | None:
    """The SAE's dataset statistics (a Neuronpedia import or a local pass), or None; a damaged store is
    said in one line and left out of the results."""
    try:
        return dataset_stats.load_best_stats(dataset_stats.sae_key(pair.model.name, pair.sae.display_name))
    except UserError as err:
        reporter.line(f"epo-tui: dataset statistics left out: {err}")
        return None


def _lost_session(recorded: RecordedSearch, err: sessions.SessionGone, folder: Path, cluster: Cluster,
                  timings: results.RunTimings | None = None) -> None:
    """The session folder was deleted under the run: the search stops, and its own results still go to
    `folder` (the run's --out); then one line for the user (a UserError)."""
    recorded.abandon(str(err))  # lets the lock go; nothing can be checkpointed any more
    try:
        results.write_result(folder, recorded.result(timings, cluster))
        where = f"its results are in {folder}/"
    except OSError as write_err:
        where = f"its results could not be written to {folder}/ either ({write_err.strerror or write_err})"
    raise UserError(f"session {recorded.session.id}'s folder was deleted ({err.folder}): the search stopped at "
                    f"iteration {recorded.state.iteration}; {where}") from None


# ----------------------------------------------------------------------------------------------
# A batch: one search per feature, then an index over them


def feature_folder(feature: int) -> str:
    return f"feature-{feature}"


def run_batch(pair: ModelWithSAE, config: Config, features: list[int], out: Path, reporter: Reporter,
              stop: StopFlag, cluster: Cluster = Cluster(), mesh: Mesh | None = None) -> dict:
    """This process's share of `features`, each in out/feature-N/; then the summaries of all processes
    are gathered and process 0 writes out/index.json and index.md. Returns the index (every process
    gets it; only process 0 writes it).

    A rerun into the same `out` continues: features whose folder holds a finished result are read back,
    not run again (the share of each process stays the same, so this holds for folders on each host's
    own disk too). Results there from another config are refused (UserError)."""
    out = Path(out)
    mine = cluster.share(features)
    mesh = mesh or pair.mesh  # this host's devices: each process searches on its own
    before = _finished_before(config, out, mine)
    if before:
        reporter.batch_skipped(sorted(before), out)
    summaries = [before[f] for f in mine if f in before]
    todo = [f for f in mine if f not in before]
    config = budget_share(config, len(todo))  # a rerun's budget goes to the features still to run
    reporter.batch_started(todo)
    interrupted = False
    try:
        for feature in todo:
            if stop.requested:
                interrupted = True
                break
            one = dataclasses.replace(config, feature=dataclasses.replace(config.feature, index=feature, indices=()))
            _clear_partial_writes(out / feature_folder(feature))
            result = run_one(pair, one, out / feature_folder(feature), reporter, stop, mesh, cluster)
            summaries.append(results.summary(result, feature_folder(feature)))
            if result["timings"]["interrupted"]:
                interrupted = True
                break
    except KeyboardInterrupt:  # a second Ctrl-C: still index what finished
        interrupted = True
    gathered = gather_summaries(summaries, cluster, rows_per_process(len(features), cluster),
                                config.search.prompt_tokens)
    index = _index(pair, gathered, features, interrupted or len(gathered) < len(features), cluster, reporter)
    if cluster.is_leader:
        results.write_index(out, index)
    return index


# Settings that do not change what a search finds: a rerun may differ in them
_RERUN_MAY_CHANGE = ("feature.index", "feature.indices", "favorites", "sae.labels", "model.model_parallel",
                     "search.time_budget")


def _finished_before(config: Config, out: Path, mine: list[int]) -> dict[int, dict]:
    """The index lines (summaries) of the features of `mine` that an earlier run of this batch finished
    in `out`, by feature. Every result in out/feature-*/ (also of features not asked for now) must come
    from the same config."""
    if not out.is_dir():
        return {}
    now = _flat(json.loads(json.dumps(config.to_dict())))  # as result.json holds it: tuples as lists
    names, found = {feature_folder(f): f for f in mine}, {}
    for folder in sorted(out.glob("feature-*")):
        result = results.read_result(folder)
        if result is None:
            continue  # not written to the end: run again if asked for
        there = _flat(result["config"])
        differ = [key for key in sorted(set(now) | set(there)) if now.get(key, _UNSET) != there.get(key, _UNSET)
                  and not any(key == k or key.startswith(k + ".") for k in _RERUN_MAY_CHANGE)]
        if differ:
            shown = "; ".join(f"{key} {_shown(there, key)} there, {_shown(now, key)} now" for key in differ[:3])
            more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
            raise UserError(f"--out {inert(str(out))}: holds results of another config ({folder.name}: "
                            f"{inert(shown)}{more}); rerun with the same settings or use another --out")
        feature = names.get(folder.name)
        if feature is not None and results.finished(result, folder, feature):
            found[feature] = results.summary(result, folder.name)
    return found


_UNSET = object()  # a key one side's config does not have (another epo-tui version wrote it)


def _shown(flat: dict, key: str) -> str:
    return repr(flat[key]) if key in flat else "unset"


def _flat(data: dict, prefix: str = "") -> dict:
    """{"search": {"seed": 0}} as {"search.seed": 0}."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _clear_partial_writes(folder: Path) -> None:
    """Temp files of an atomic write that a killed process left behind (atomic.py names them .NAME.*.tmp)."""
    for name in results.RESULT_FILES:
        for partial in folder.glob(f".{name}.*.tmp"):
            partial.unlink(missing_ok=True)


def budget_share(config: Config, features: int) -> Config:
    """The config each of `features` searches runs with: an equal share of search.time_budget (a
    batch's budget is its wall clock, split between the features this process runs)."""
    seconds = budget_seconds(config.search.time_budget)
    if seconds is None or features < 1:
        return config
    share = format_budget(seconds / features)
    return dataclasses.replace(config, search=dataclasses.replace(config.search, time_budget=share))


def _index(pair: ModelWithSAE, gathered: list[dict], features: list[int], interrupted: bool,
           cluster: Cluster, reporter: Reporter) -> dict:
    for entry in gathered:  # prompts travel as ids between processes; the text is decoded here
        entry["prompt"] = pair.model.decode(entry["token_ids"])
        entry["folder"] = feature_folder(entry["feature"])
    return results.build_index(gathered, model=pair.model.name,
                               sae={"name": pair.sae.display_name, "hook": pair.sae.hook_name},
                               features_requested=features, interrupted=interrupted, process=cluster.to_json(),
                               dataset=_dataset_stats(pair, reporter))


def random_features(count: int, d_sae: int, seed: int) -> list[int]:
    """`count` distinct latents drawn uniformly from range(d_sae) by numpy's RNG seeded with `seed`."""
    return sorted(int(i) for i in np.random.default_rng(seed).choice(d_sae, size=count, replace=False))
