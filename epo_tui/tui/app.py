"""The Textual app: features on the left, the live elites and the frontier on the right.

The screen is up before the worker is: the app starts the worker (`epo_tui.client`) in the background
and shows its loading state; every pane is fed from the client's bus, where progress arrives
coalesced, so a slow terminal never slows the search. The app never imports the engine.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer

from epo_tui import dataset_stats, favorites, labels, neuronpedia, protocol
from epo_tui.client import WORKER_DIED, WorkerClient, WorkerError
from epo_tui.config import Config
from epo_tui.errors import UserError
from epo_tui.export_lines import ExportTarget, count
from epo_tui.features import FeatureEntry, alive_indices
from epo_tui.stars import Stars
from epo_tui.text import inert
from epo_tui.themes import Theme, load_theme
from epo_tui.tui import worker_messages
from epo_tui.tui.components.dataset import DatasetPane
from epo_tui.tui.components.elites import ElitesPane
from epo_tui.tui.components.features import FeatureList, FeaturePane
from epo_tui.tui.components.frontier import FrontierPane
from epo_tui.tui.components.status import StatusBar
from epo_tui.tui.keymap import KeyScope, checked_keymap, rebound
from epo_tui.tui.screens.help import HelpScreen
from epo_tui.tui.screens.note import NoteEditor
from epo_tui.tui.screens.prompts import EliteDetails, PromptEditor, Scratchpad
from epo_tui.tui.screens.sessions import SessionChoice, SessionsScreen
from epo_tui.tui.screens.settings import SearchSettings
from epo_tui.tui.themes import textual_theme

LOAD_TIMEOUT_S = 600.0  # a large model from the hub cache can take minutes to load
SCRATCHPAD_TOP_FEATURES = 8  # latents the scratchpad lists as firing most on the typed text


@dataclass(frozen=True)
class LoadSpec:
    """How the worker loads its model and SAE: the fields of the `load` command."""

    fields: dict[str, Any]

    @classmethod
    def of(cls, config: Config, demo: bool) -> LoadSpec:
        return cls({"demo": True} if demo else {"config": config.to_dict()})

    def command(self) -> protocol.LoadCommand:
        return protocol.LoadCommand(**self.fields)


class EpoApp(App):
    AUTO_FOCUS = "#feature-list"  # the app's keys work at once; `/` moves to the search box
    CSS = """
    #body { height: 1fr; }
    #features { width: 40%; min-width: 30; }
    #right { width: 1fr; }
    #elites { height: 1fr; }
    #frontier { height: 1fr; min-height: 8; }
    """
    # The footer shows them in this order (the focused pane's first): the daily keys come first so an
    # 80-column footer keeps them; every binding is also in the command palette.
    BINDINGS = [
        Binding("/", "focus_search", "Search", id="main.search"),
        Binding("s", "start", "Start", id="main.start"),
        Binding("p", "pause", "Pause", id="main.pause"),
        Binding("x", "stop", "Stop", id="main.stop"),
        Binding("f", "favorite", "Favorite", id="main.favorite"),
        Binding("q", "quit", "Quit", id="main.quit"),
        Binding("o", "sessions", "Sessions", id="main.sessions"),
        Binding("c", "copy", "Copy", id="main.copy"),
        Binding("e", "edit", "Edit & inject", id="main.edit"),
        Binding("d", "details", "Details", id="main.details"),
        Binding("t", "scratchpad", "Scratchpad", id="main.scratchpad"),
        Binding("S", "settings", "Settings", id="main.settings"),
        Binding("i", "import", "Import a Neuronpedia export", show=False, id="main.import"),
        Binding("R", "restart", "Restart worker", show=False, id="main.restart"),
        Binding("question_mark", "help", "Help: every key", show=False, id="main.help"),
        Binding("f1", "help", "Help: every key", show=False, id="main.help"),
    ]

    def __init__(self, config: Config, load: LoadSpec, worker_command: list[str] | None = None,
                 theme: Theme | None = None):
        super().__init__()
        self.config, self.load = config, load
        self.keymap = checked_keymap(config.keys, key_scopes(), config.source)  # ConfigError before the UI
        self.client = WorkerClient(worker_command)
        self.epo_theme = theme or load_theme()
        self.chosen: FeatureEntry | None = None
        self.combined: list[int] | None = None  # two features picked to combine, else None
        self.state = "starting"
        self.ready: protocol.Ready | None = None
        self.session: protocol.Started | None = None  # the `started` event of the current search
        # what favorites name as their source: the live session's or a reopened session's meta
        self.session_meta: dict[str, Any] | None = None
        self.search_overrides: dict[str, Any] = {}  # [search] keys changed in the settings form
        self.worker_dead = False
        self.last_outcome: str | None = None  # how the last search ended (finished, stopped): shown when idle
        self.dataset: dataset_stats.DatasetStats | None = None  # the loaded SAE's dataset statistics, if any

    # -- layout

    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        with Horizontal(id="body"):
            yield FeaturePane(id="features")
            with Vertical(id="right"):
                yield ElitesPane(self.epo_theme, id="elites")
                yield DatasetPane(self.epo_theme, id="dataset")
                yield FrontierPane(self.epo_theme, id="frontier")
        yield Footer()

    def on_mount(self) -> None:
        self.title = "epo-tui"
        self.set_keymap(self.keymap)
        self.register_theme(textual_theme(self.epo_theme))
        self.theme = self.epo_theme.name
        self.query_one(StatusBar).show(state="starting the worker")
        self.serve_worker()

    # -- the worker

    @work(exclusive=True, group="worker")
    async def serve_worker(self) -> None:
        """Starts the worker, loads the model, then posts every event to the app as a Textual message
        (`worker_messages`), handled below, until the end."""
        events = self.client.bus.subscribe()
        try:
            await self.client.start()
            self.status(state="loading the model and SAE")
            await self.client.request(self.load.command(), timeout=LOAD_TIMEOUT_S)
            await self.client.send(protocol.FeaturesCommand())
        except WorkerError as err:
            self.notify(inert(err.message), title="the worker failed", severity="error", timeout=30)
        async for event in events:
            self.post_message(worker_messages.message_for(event))

    def on_worker_ready(self, message: worker_messages.Ready) -> None:
        ready = self.ready = message.event
        self.worker_dead = False
        self.status(state="ready", model=ready.model, sae=ready.sae, hook=ready.hook,
                    devices=f"{len(ready.devices)}x {ready.device_kind}")

    def on_worker_feature_list(self, message: worker_messages.FeatureList) -> None:
        entries = message.event.features
        pane = self.query_one(FeaturePane)
        pane.set_features(entries, Stars.load(self._sae_key()))
        pane.set_alive(alive_indices(entries))  # `r` draws among the latents that fire
        self.chosen = next((e for e in entries if e.index == self.config.feature.index), None)
        self.apply_imported_labels()
        self.load_dataset()

    @work(exclusive=True, group="dataset")
    async def load_dataset(self) -> None:
        """Reads the SAE's dataset statistics (a Neuronpedia import or a local pass), off the UI thread."""
        try:
            self.dataset = await asyncio.to_thread(dataset_stats.load_best_stats, self._sae_key())
        except UserError as err:
            self.notify(inert(str(err)), title="dataset statistics not read", severity="warning", timeout=15,
                        markup=False)
        self.query_one(FeaturePane).set_dataset(self.dataset)
        self.show_dataset()

    def show_dataset(self) -> None:
        """The dataset examples of the latent in view (`_dataset_latent`); the maximum of the latent the
        elites and the frontier belong to (`_searched_latent`) as the frontier's line and the colour scale."""
        latent = self._dataset_latent()
        self.query_one(DatasetPane).show_latent(self.dataset, latent)
        self.query_one(FrontierPane).set_dataset_max(self._searched_max())
        self._share_colour_scale()

    def _dataset_latent(self) -> int | None:
        """The latent whose examples are shown: the one a running (or paused) search optimizes, else the
        chosen one; None when that is several latents."""
        if self.session is not None and self.state in ("compiling", "running", "paused", "stopping"):
            return self._searched_latent()
        return self._chosen_latent()

    def _chosen_latent(self) -> int | None:
        return self.chosen.index if self.chosen is not None and not self.combined else None

    def _searched_latent(self) -> int | None:
        """The latent of the elites and frontier on screen: the last search's (even once it ended), else
        the chosen one, which the next search will optimize; None when that is several latents."""
        if self.session is not None:
            return _single_latent(self.session.feature)
        return self._chosen_latent()

    def _searched_max(self) -> float | None:
        return self._dataset_max(self._searched_latent())

    def _dataset_max(self, latent: int | None) -> float | None:
        return self.dataset.max(latent) if self.dataset is not None and latent is not None else None

    def _share_colour_scale(self) -> None:
        """Elites and dataset examples on one colour scale: up to the larger of the strongest elite token
        and the searched latent's dataset maximum, so a dream and an example compare at a glance."""
        elites, pane = self.query_one(ElitesPane), self.query_one(DatasetPane)
        elites.set_scale_floor(self._searched_max() or 0.0)
        pane.set_scale(elites.scale_max)

    def _versus_dataset(self, elites: list[protocol.Elite]) -> str:
        """'best 1.24× dataset max at xent 4.1' for the most active elite; '' where no maximum is known."""
        top = self._searched_max()
        if not elites or top is None or top <= 0:
            return ""
        best = max(elites, key=lambda e: e.act)
        return f"best {best.act / top:.2f}× dataset max at xent {best.xent:.2g}"

    def on_worker_state(self, message: worker_messages.State) -> None:
        event = message.event
        self.state = event.state
        shown = event.state + (f": {event.detail}" if event.detail else "")
        if event.state == "idle" and self.last_outcome:
            shown = f"idle: the search {self.last_outcome}"
        self.status(state=shown)

    def on_worker_started(self, message: worker_messages.Started) -> None:
        event = message.event
        self.session, self.last_outcome = event, None
        self.session_meta = self._live_meta(event)
        self.query_one(FrontierPane).reset()
        self.query_one(ElitesPane).penalty_scale = event.penalty_scale or ""
        self.query_one(ElitesPane).update_elites(event.elites)
        self.show_dataset()
        self.status(session=event.session, label=event.label, iteration=event.iteration,
                    total=event.iterations_total, budget_left=None, versus_dataset=self._versus_dataset(event.elites))

    def on_worker_progress(self, message: worker_messages.Progress) -> None:
        event = message.event
        self.query_one(ElitesPane).update_elites(event.elites)
        self.query_one(FrontierPane).add_progress(event)
        self._share_colour_scale()
        self.status(iteration=event.iteration, total=event.iterations_total, rate=event.it_per_s,
                    budget_left=event.budget_left_s, versus_dataset=self._versus_dataset(event.elites))

    def on_worker_finished(self, message: worker_messages.Finished) -> None:
        event = message.event
        why = f": {event.reason}" if event.reason else ""  # e.g. the time budget ran out
        self.last_outcome = event.status + why
        self.status(iteration=event.iteration, total=event.iterations_total, rate=None, budget_left=None)
        self.notify(f"search {event.status} at iteration {event.iteration}{inert(why)}; results in "
                    f"{inert(event.folder)}", title="finished")

    def on_worker_error(self, message: worker_messages.Error) -> None:
        event = message.event
        if event.kind == WORKER_DIED:
            self.worker_dead = True
            tail = "\n".join(inert(line) for line in event.stderr_tail[-5:])
            self.status(state="worker died: press R to restart and resume")
            self.notify(f"{inert(event.message)}\n{tail}", title="the worker died", severity="error", timeout=60)
        else:
            self.notify(inert(event.message), title=f"error ({event.kind})", severity="error", timeout=15)

    def on_worker_log(self, message: worker_messages.Log) -> None:
        self.notify(inert(message.event.message), title=f"worker {message.event.level}", severity="warning")

    def status(self, **fields: Any) -> None:
        self.query_one(StatusBar).show(**fields)

    def _live_meta(self, started: protocol.Started) -> dict[str, Any]:
        """The live session's meta, as a saved session's meta.json names it (what favorites record)."""
        ready = self.ready
        return {"id": started.session, "label": started.feature_label, "model": ready.model if ready else None,
                "sae": {"name": ready.sae if ready else None, "hook": ready.hook if ready else None},
                "feature": {"indices": list(started.feature.get("indices") or [])}}

    def _sae_key(self) -> str:
        ready = self.ready
        return f"{ready.model}|{ready.sae}" if ready else "None|None"

    # -- choosing features

    def on_feature_pane_combine(self, message: FeaturePane.Combine) -> None:
        self.combined = [e.index for e in message.entries]
        self.status(label="features " + " + ".join(map(str, self.combined)))
        self.notify(f"features {' and '.join(map(str, self.combined))} combined ({self.config.feature.combine}): "
                    "press s to start", timeout=4)

    def on_feature_pane_chosen(self, message: FeaturePane.Chosen) -> None:
        self.combined = None
        self.chosen = message.entry
        label = f": {message.entry.label}" if message.entry.label else ""
        self.status(label=f"feature {message.entry.index}{label}")
        self.notify(f"feature {message.entry.index} chosen: press s to start", timeout=4)
        self.show_dataset()

    # -- actions

    def action_focus_search(self) -> None:
        self.query_one(FeaturePane).focus_search()

    async def _send(self, command: protocol.Command) -> None:
        try:
            await self.client.send(command)
        except WorkerError as err:
            self.notify(inert(err.message), title=f"cannot {command.TYPE}", severity="error")

    def _worker_ready(self) -> bool:
        """Whether the worker has loaded its model; says so when not."""
        if self.ready is None:
            self.notify("the worker is not ready yet", severity="warning")
        return self.ready is not None

    def _no_search_running(self, then: str = "first") -> bool:
        """Whether no search runs (or compiles, or is paused); asks to stop it when one does."""
        running = self.state in ("running", "paused", "compiling")
        if running:
            self.notify(f"a search is running: press x to stop it {then}", severity="warning")
        return not running

    async def action_start(self) -> None:
        if not (self._worker_ready() and self._no_search_running()):
            return
        feature = ({"indices": self.combined} if self.combined
                   else {"index": self.chosen.index if self.chosen else self.config.feature.index})
        await self._send(protocol.StartCommand(feature=feature, search=dict(self.search_overrides)))

    async def action_pause(self) -> None:
        if self.state == "running":
            await self._send(protocol.PauseCommand())
        elif self.state == "paused":
            await self._send(protocol.ResumeCommand())

    async def action_stop(self) -> None:
        if self.state in ("running", "paused"):
            await self._send(protocol.StopCommand())

    def _selected(self) -> protocol.Elite | None:
        elite = self.query_one(ElitesPane).selected_elite
        if elite is None:
            self.notify("no elite selected yet", severity="warning")
        return elite

    async def action_favorite(self) -> None:
        elite = self._selected()
        if elite is None or self.session_meta is None:
            return
        path = favorites.favorites_path(self.config)
        try:
            top = self._dataset_max(_single_latent(self.session_meta.get("feature") or {}))
            entry = favorites.favorite_from_elite(self.session_meta, elite, dataset_max=top)
            saved = await asyncio.to_thread(favorites.append_favorite, path, entry)
        except Exception as err:  # noqa: BLE001 - a failed save is told, never fatal
            self.notify(inert(str(err)), title="favorite not saved", severity="error", timeout=15)
            return
        self.notify(f"saved to {inert(str(saved))}", title="favorite")

    def _session_features(self) -> list[int]:
        return list(((self.session_meta or {}).get("feature") or {}).get("indices") or [])

    def action_copy(self) -> None:
        elite = self._selected()
        if elite is not None:
            self.copy_to_clipboard(elite.text)
            self.notify("prompt copied (OSC 52: your terminal must allow it)")

    def action_edit(self) -> None:
        elite = self._selected()
        if elite is None or self.state not in ("running", "paused"):
            return

        async def inject(text: str | None) -> None:
            if not text:
                return
            try:
                answer = await self.client.request(protocol.InjectCommand(text=text), timeout=LOAD_TIMEOUT_S)
            except WorkerError as err:
                self.notify(inert(err.message), title="not injected", severity="error")
                return
            self.notify(f"now elite {answer.elite + 1}: act {answer.act:.3f}, xent {answer.xent:.3f}",
                        title="injected")

        self.push_screen(PromptEditor("edit the prompt; enter puts it into the population", elite.text), inject)

    def action_scratchpad(self) -> None:
        if not self._worker_ready():
            return
        features = self._session_features() or [self.chosen.index if self.chosen else self.config.feature.index]

        async def score(text: str, feature: int) -> protocol.Scored:
            return await self.client.request(protocol.ScoreCommand(text=text, feature=feature,
                                                                   top_features=SCRATCHPAD_TOP_FEATURES), timeout=60)

        pane = self.query_one(FeaturePane)

        def label_of(index: int) -> str | None:
            position = pane.search.position.get(index)
            return pane.search.labels[position] if position is not None else None

        def choose(index: int | None) -> None:  # a latent picked among those firing on the text
            if index is not None and not pane.choose(index):
                self.notify(f"feature {index} is not in the catalog", severity="warning")

        self.push_screen(Scratchpad(self.epo_theme, features[0], score, label_of), choose)

    def action_details(self) -> None:
        if self._selected() is not None:
            self.push_screen(EliteDetails(self.query_one(ElitesPane).details()))

    # -- labels, sessions, settings

    def apply_imported_labels(self) -> None:
        """Shows the labels imported earlier for this SAE (kept in the data folder)."""
        try:
            imported = labels.read_imported(self._sae_key())
        except UserError as err:
            self.notify(inert(str(err)), title="imported labels not read", severity="warning", timeout=10)
            return
        if imported:
            self.query_one(FeaturePane).apply_labels(imported)

    def action_import(self) -> None:
        """A Neuronpedia export (a file, or a folder of batches): explanations become labels, activations
        and features the dataset statistics, kept for this SAE; the same import as `epo-tui import`."""
        if not self._worker_ready():
            return

        async def load(path: str | None) -> None:
            if not path:
                return
            sae_key = self._sae_key()
            # the worker says which SAE is loaded; an older worker sends no neuronpedia_id: not checked
            target = ExportTarget(neuronpedia_id=self.ready.neuronpedia_id, d_sae=self.ready.d_sae)
            try:
                outcome = await asyncio.to_thread(neuronpedia.import_exports, [Path(path).expanduser()], sae_key,
                                                  target)
            except (UserError, OSError) as err:
                self.notify(inert(str(err)), title="not imported", severity="error", timeout=15,
                            markup=False)  # it quotes the file: shown as text, never as markup
                return
            if outcome.labels is not None:
                found = outcome.labels.labels
                applied = self.query_one(FeaturePane).apply_labels(found)
                self._notify_import(f"{applied} of {len(found)} labels match this SAE's features",
                                    "labels imported", outcome.source_notes + outcome.labels.notes)
            if outcome.stats is not None:
                stats = outcome.stats
                self._notify_import(f"statistics of {count(stats.latents, 'latent')}, {count(stats.examples, 'example')}",
                                    "dataset statistics imported", outcome.source_notes + stats.notes)
                self.load_dataset()

        self.push_screen(PromptEditor("a Neuronpedia export (a folder, or a .jsonl or .jsonl.gz file): path", ""),
                         load)

    def _notify_import(self, what: str, title: str, notes: tuple[str, ...]) -> None:
        shown = "".join(f"\n{inert(note)}" for note in notes)
        self.notify(f"{what}; kept for next time{shown}", title=title, severity="warning" if notes else "information",
                    timeout=15 if notes else 5, markup=False)

    def action_sessions(self) -> None:
        """The worker's saved sessions (a remote worker's are that host's); favorites and stars stay here."""
        if not self.client.running:
            self.notify("the sessions are the worker's, and it is not running: R restarts it",
                        title="sessions", severity="warning")
            return
        self.push_screen(SessionsScreen(self.client), self._session_chosen)

    async def _session_chosen(self, choice: SessionChoice | None) -> None:
        if choice is None:
            return
        if choice.action == "open":
            if not self._no_search_running(then="before opening another"):
                return
            self.session, self.session_meta = None, choice.meta
            self.query_one(ElitesPane).penalty_scale = ""  # a saved session's meta does not keep it
            self.query_one(ElitesPane).update_elites(choice.elites)
            self.query_one(FrontierPane).show_saved(choice.history, choice.elites)
            meta = choice.meta
            self.status(session=choice.session_id, label=meta.get("label"), iteration=meta.get("iteration"),
                        total=meta.get("iterations_total"), rate=None)
            self.notify(f"session {choice.session_id} opened ({meta.get('status')}): f saves an elite, "
                        "o then r resumes it", title="session")
            return
        if not (self._worker_ready() and self._no_search_running()):
            return
        done, total = choice.session.iteration, choice.session.iterations_total
        more = None
        if done >= total:  # a finished session goes on for another search's worth of iterations
            more = done + int(self.search_overrides.get("iterations", self.config.search.iterations))
        await self._send(protocol.ResumeCommand(session=choice.session_id, iterations=more))

    def action_settings(self) -> None:
        def keep(overrides: dict[str, Any] | None) -> None:
            if overrides is None:
                return
            self.search_overrides = overrides
            changed = ", ".join(f"{k} {v}" for k, v in overrides.items()) or "the config's values"
            self.notify(f"the next search uses {inert(changed)}", title="search settings")

        self.push_screen(SearchSettings(self.config, self.search_overrides), keep)

    def action_help(self) -> None:
        self.push_screen(HelpScreen([(scope.where, rebound(scope.bindings, self.keymap)) for scope in key_scopes()]))

    async def action_restart(self) -> None:
        if not self.worker_dead:
            return
        self.status(state="restarting the worker")
        try:
            await self.client.restart(resume=self.session is not None, timeout=LOAD_TIMEOUT_S)
        except WorkerError as err:
            self.notify(inert(err.message), title="restart failed", severity="error")

    async def on_unmount(self) -> None:
        """However the app ends (q, or a test's pilot leaving), its worker is stopped: a running search
        checkpoints, and no worker process outlives the app (after q this finds it stopped already)."""
        await self.client.close()

    async def action_quit(self) -> None:
        """Stops the worker cleanly: a running search is checkpointed and stays resumable."""
        self.status(state="stopping the worker (the session stays resumable)")
        await self.client.close()
        self.exit()

    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        keys: dict[str, list[Binding]] = {}  # one command per action, with all its keys (? and F1: help)
        for binding in rebound(self.BINDINGS, self.keymap):
            keys.setdefault(binding.action, []).append(binding)
        for action, bindings in keys.items():
            shown = " or ".join(self.get_key_display(b) for b in bindings)
            yield SystemCommand(bindings[0].description, f"key {shown}", lambda action=action: self.run_action(action))
        pane = self.query_one(FeaturePane)
        for binding in rebound(FeaturePane.BINDINGS, self.keymap):
            yield SystemCommand(f"Feature: {binding.description}", f"key {self.get_key_display(binding)}"
                                " in the feature list", lambda action=binding.action: pane.run_action(action))


def _single_latent(feature: dict[str, Any]) -> int | None:
    """The latent a search's feature record ({"indices": [...]}) optimizes; None for several."""
    indices = list(feature.get("indices") or [])
    return indices[0] if len(indices) == 1 else None


def key_scopes() -> list[KeyScope]:
    """Every screen's rebindable keys, as the help screen lists them and `[keys]` may change them; the
    main screen's keys and its feature list's are active at once (one group)."""
    return [
        KeyScope("main screen", tuple(EpoApp.BINDINGS), group="main"),
        KeyScope("feature list", tuple(FeaturePane.BINDINGS + FeatureList.BINDINGS), group="main"),
        KeyScope("sessions browser (o)", tuple(SessionsScreen.BINDINGS), group="sessions"),
        KeyScope("search settings (S)", tuple(SearchSettings.BINDINGS), group="settings"),
        KeyScope("scratchpad (t)", tuple(Scratchpad.BINDINGS), group="scratchpad"),
        KeyScope("elite details (d)", tuple(EliteDetails.BINDINGS), group="details"),
        KeyScope("edit and inject (e)", tuple(PromptEditor.BINDINGS), group="editor"),
        KeyScope("feature note (n)", tuple(NoteEditor.BINDINGS), group="note"),
        KeyScope("this help (? or F1)", tuple(HelpScreen.BINDINGS), group="help"),
    ]
