"""A search that is also a session: checkpoints at most `checkpoint_seconds` apart and whenever it
stops, the frontier history, the status; and a session resumed exactly where it stopped.

Shared by the worker (`epo-tui worker`) and the headless `epo-tui run` (and `run --resume ID`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import numpy as np

from epo_tui import results, sessions
from epo_tui.protocol import Elite, FrontierPoint
from epo_tui.config import Config, config_from_data
from epo_tui.engine.state_arrays import new_frontier_points, state_arrays, state_from_arrays
from epo_tui.engine.distributed import Cluster
from epo_tui.engine.pairing import ModelWithSAE
from epo_tui.engine.reporting import feature_record, features_label, result_of
from epo_tui.engine.reporting import elite_reports
from epo_tui.engine.search import Search, SearchState
from epo_tui.errors import UserError

CHECKPOINT_SECONDS = 30.0


def session_config(session: sessions.Session, meta: dict | None = None) -> Config:
    """The config a session ran with (validated again: the file may have been edited or damaged)."""
    meta = meta if meta is not None else session.read_meta()
    return config_from_data(meta["config"], source=f"session {session.id}")


class RecordedSearch:
    """One search and its session. `step()` runs an iteration and checkpoints when due."""

    def __init__(self, search: Search, state: SearchState, session: sessions.Session, iterations_total: int,
                 checkpoint_seconds: float = CHECKPOINT_SECONDS, feature_label: str | None = None):
        self.search, self.state, self.session = search, state, session
        self.feature_label = feature_label  # the features' interpretation, as the session's meta keeps it
        self.runner_lock = session.claim()  # released in finish(); the OS drops it if this process dies
        self.iterations_total = iterations_total
        self.checkpoint_seconds = checkpoint_seconds
        self.last_checkpoint = time.monotonic()
        self.pending_history: list[FrontierPoint] = []  # frontier points since the last checkpoint
        self.seconds: list[float] = []
        self._elites: tuple[int, list[Elite]] | None = None  # (iteration, reports): progress, checkpoint, result

    # -- creation

    @classmethod
    def start(cls, pair: ModelWithSAE, config: Config, mesh=None, seed_prompt: str | None = None,
              label: str | None = None, root: Path | None = None,
              checkpoint_seconds: float = CHECKPOINT_SECONDS, search: Search | None = None) -> RecordedSearch:
        search = search or Search(pair, config, mesh=mesh)  # `search`: already set up for this config
        state = search.initial_state(seed_prompt)
        session = sessions.create_session({
            "config": config.to_dict(), "feature": feature_record(search).to_json(),
            "lambdas": search.lambdas_K.tolist(),
            "model": pair.model.name, "sae": {"name": pair.sae.display_name, "hook": pair.sae.hook_name},
            "label": label, "iteration": 0, "iterations_total": config.search.iterations,
            "seed_prompt": seed_prompt}, root=root)
        recorded = cls(search, state, session, config.search.iterations, checkpoint_seconds, feature_label=label)
        recorded.pending_history = recorded._points(state.frontier, np.arange(len(state.frontier)))
        recorded.checkpoint("running")
        return recorded

    @classmethod
    def resume(cls, pair: ModelWithSAE, session: sessions.Session, mesh=None, iterations_total: int | None = None,
               checkpoint_seconds: float = CHECKPOINT_SECONDS) -> RecordedSearch:
        """`session` continued from its checkpoint. `iterations_total` is the new total, more than the
        checkpoint's iteration (else UserError); None keeps the session's own, or gives a finished session
        another search's worth (its config's search.iterations)."""
        meta = session.read_meta()
        config = session_config(session, meta)
        arrays, _ = session.read_checkpoint()
        search = Search(pair, config, mesh=mesh)
        try:
            state = state_from_arrays(arrays, config.search.elites, config.search.prompt_tokens)
        except ValueError as err:
            raise UserError(f"session {session.id}: {err}") from None
        state = search.admissible(state)
        total = iterations_total or int(meta.get("iterations_total") or config.search.iterations)
        if iterations_total is not None and total <= state.iteration:
            raise UserError(f"session {session.id} is at iteration {state.iteration} already: the new total "
                            f"of iterations must be more than that")
        if total <= state.iteration:  # a finished session goes on for another search's worth, as in the UI
            total = state.iteration + config.search.iterations
        recorded = cls(search, state, session, total, checkpoint_seconds, feature_label=meta.get("label"))
        session.update_meta(status="running", iterations_total=total, error=None)
        return recorded

    # -- running

    @property
    def done(self) -> bool:
        return self.state.iteration >= self.iterations_total

    def step(self) -> dict:
        """One iteration, then a checkpoint if one is due; returns what changed (for a progress event):
        the new frontier points. A checkpoint that fails raises (SessionError) after the iteration:
        `self.state` is then the new state, the session on disk still the last checkpoint."""
        changed = self.advance()
        changed["checkpointed"] = self.checkpoint_if_due()
        return changed

    def advance(self) -> dict:
        """One iteration, nothing written; returns the new frontier points (`frontier_new`: FrontierPoints)."""
        before = self.state.frontier
        t0 = time.perf_counter()
        self.state, _ = self.search.step(self.state)
        self.seconds.append(time.perf_counter() - t0)
        new = self._points(self.state.frontier, new_frontier_points(before, self.state.frontier))
        self.pending_history.extend(new)
        return {"frontier_new": new}

    def checkpoint_if_due(self) -> bool:
        """Checkpoints when `checkpoint_seconds` have passed since the last one (or the last failed
        try: a full disk is tried again that much later, not every iteration); whether it did."""
        if time.monotonic() - self.last_checkpoint < self.checkpoint_seconds:
            return False
        self.checkpoint("running")
        return True

    def iterations_per_second(self, window: int = 10) -> float | None:
        """The rate of the last `window` iterations, leaving out this process's first (it compiles: counted,
        it made a 4-minute search read "ETA 26m53s"); None until a second iteration is done."""
        recent = self.seconds[1:][-window:]
        return len(recent) / sum(recent) if recent and sum(recent) > 0 else None

    def elites(self) -> list[Elite]:
        """The elites' reports (one forward pass), computed once per iteration."""
        if self._elites is None or self._elites[0] != self.state.iteration:
            self._elites = (self.state.iteration, elite_reports(self.search, self.state))
        return self._elites[1]

    def checkpoint(self, status: str, error: str | None = None) -> None:
        """The state, the elites and the history so far, then the status: in that order, so the
        session never claims more than its checkpoint holds. A failed write (SessionError: disk full,
        folder deleted) leaves the earlier files as they were (atomic writes); the points not yet in
        history.jsonl stay pending for the next try."""
        try:
            self.session.write_checkpoint(state_arrays(self.state), self.state.iteration,
                                          [e.to_json() for e in self.elites()])
            if self.pending_history:
                self.session.append_history([p.to_json() for p in self.pending_history])
                self.pending_history = []
            self.session.update_meta(status=status, iteration=self.state.iteration, error=error)
        finally:
            self.last_checkpoint = time.monotonic()  # a failed try counts too: the next is one period later

    def finish(self, status: str, error: str | None = None, timings: results.RunTimings | None = None,
               cluster: Cluster = Cluster()) -> dict:
        """A last checkpoint, and result.json + report.md in the session folder; returns the result.
        Releases the session for other processes."""
        try:
            self.checkpoint(status, error)
        finally:
            self.release()
        result = self.result(timings, cluster)
        if not (self.session.folder / sessions.META_FILE).exists():  # deleted meanwhile: do not recreate it
            raise sessions.SessionGone(self.session.folder)
        try:
            results.write_result(self.session.folder, result)
        except OSError as err:  # disk full after the checkpoint (or the folder deleted meanwhile)
            if not self.session.folder.is_dir():
                raise sessions.SessionGone(self.session.folder) from None
            raise sessions.SessionError(Path(err.filename or self.session.folder / "result.json"),
                                        f"could not write: {err.strerror or err}") from None
        return result

    def result(self, timings: results.RunTimings | None = None, cluster: Cluster = Cluster()) -> dict:
        """The run's result (as result.json holds it) for the state in memory; writes nothing."""
        if timings is None:
            timings = results.RunTimings(iterations_requested=self.iterations_total, iteration_s=list(self.seconds),
                                         interrupted=not self.done)
        result = result_of(self.search, self.state, timings, cluster, elites=self.elites())
        result["session"] = self.session.id
        return result

    def abandon(self, error: str) -> None:
        """After a crash in this process: checkpoint what is complete, mark it crashed, let it go."""
        try:
            with contextlib.suppress(Exception):
                self.checkpoint("crashed", error=error)
        finally:
            self.release()

    def release(self) -> None:
        """Lets the session go (its runner lock). Safe to call again."""
        self.runner_lock.release()

    def inject(self, text: str) -> tuple[int, Elite]:
        """Puts a prompt from `text` into the population (cut to the prompt length, or continued by the
        model when shorter): it replaces the elite k whose fitness f_k it lowers least (or raises
        most), and enters the frontier. Returns (k, that elite's report)."""
        if not text:
            raise UserError("inject: the text is empty")
        candidate = self.search.initial_state(text, "inject: the text")  # K continuations of the text, all valid
        tokens, objective = candidate.tokens_KxN[0], float(candidate.objective_K[0])
        act, xent = float(candidate.act_K[0]), float(candidate.xent_K[0])
        state, weights = self.state, self.search.xent_weights_K
        gain_K = (objective - weights * xent) - (state.objective_K - weights * state.xent_K)
        k = int(np.argmax(gain_K))
        # copies: the state's arrays may be read-only views (of device buffers or a loaded checkpoint)
        changed = {name: np.array(getattr(state, name)) for name in ("tokens_KxN", "objective_K", "act_K", "xent_K")}
        for name, value in zip(changed, (tokens, objective, act, xent)):
            changed[name][k] = value
        before = state.frontier
        self.state = dataclasses.replace(state, **changed, frontier=before.merged([xent], [objective], [act],
                                                                                  tokens[None]))
        self._elites = None  # same iteration, other elites
        state = self.state
        self.pending_history.extend(self._points(state.frontier, new_frontier_points(before, state.frontier)))
        return k, self.elites()[k]

    def label(self) -> str:
        return features_label(self.search.config)

    def _points(self, frontier, indices) -> list[FrontierPoint]:
        decode = self.search.pair.model.decode
        return [FrontierPoint(iteration=self.state.iteration, xent=float(frontier.xent[i]),
                              objective=float(frontier.objective[i]), act=float(frontier.act[i]),
                              token_ids=frontier.tokens[i].tolist(), text=decode(frontier.tokens[i]))
                for i in indices]


def with_overrides(config: Config, feature: dict | None = None, search: dict | None = None) -> Config:
    """The config with some [feature] / [search] keys replaced, validated as a config file would be."""
    data = config.to_dict()
    for section, changes in (("feature", feature), ("search", search)):
        if changes:
            data[section] = {**data[section], **changes}
            if section == "feature" and "index" in changes and "indices" not in changes:
                data["feature"]["indices"] = []
    return dataclasses.replace(config_from_data(data, source="the start command"), source=config.source)
