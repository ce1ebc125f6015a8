"""Every action of the main screen, driven by a pilot against the protocol-speaking fake worker: what the
app sends (the worker records each command line) and what the screen shows. The real-worker flows
(start, pause, scratchpad, inject, favorite, quit, restart after SIGKILL) are in test_app.py."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from epo_tui import favorites, labels, sessions
from epo_tui.labels import write_explanations
from epo_tui.tui.components.elites import ElitesPane
from epo_tui.tui.components.features import FeaturePane
from epo_tui.tui.components.frontier import FrontierPane
from epo_tui.tui.components.status import StatusBar
from epo_tui.tui.screens.prompts import EliteDetails, PromptEditor, Scratchpad
from epo_tui.tui.screens.sessions import SessionsScreen
from epo_tui.tui.screens.settings import SearchSettings
from fake_worker import UI_PENALTY_SCALE
from tui_pilot import fake_app, ready, search_until, until

SIZE = (120, 34)


@pytest.fixture(autouse=True)
def own_folders(tmp_path, monkeypatch):
    """Each test its own sessions, labels and favorites: the browser's rows are exactly this test's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))


def _commands(record) -> list[dict]:
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def _sent(record, type_: str) -> list[dict]:
    return [c for c in _commands(record) if c["type"] == type_]


def _run(app, scenario) -> None:
    async def main():
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot)
            await scenario(pilot)
            await pilot.press("q")
            await until(pilot, lambda: not app.is_running, "the app to exit")

    asyncio.run(main())


async def _start(pilot) -> None:
    await pilot.press("s")
    await until(pilot, lambda: (pilot.app.query_one(StatusBar).fields.get("iteration") or 0) == 5,
                "five iterations")


def test_start_pause_resume_stop_send_their_commands(tmp_path):
    record = tmp_path / "commands.jsonl"
    app = fake_app(record=record)

    async def scenario(pilot):
        await _start(pilot)
        assert _sent(record, "start")[-1]["feature"] == {"index": 24} and app.state == "running"
        await pilot.press("p")
        await until(pilot, lambda: app.state == "paused", "pause")
        await pilot.press("p")
        await until(pilot, lambda: app.state == "running", "resume")
        await pilot.press("s")  # refused while a search runs: nothing sent
        await pilot.press("x")
        await until(pilot, lambda: app.state == "idle", "stop")
        status = app.query_one(StatusBar).fields["state"]
        assert status == "idle: the search stopped"

    _run(app, scenario)
    assert [c["type"] for c in _commands(record) if c["type"] in ("start", "pause", "resume", "stop")] == \
        ["start", "pause", "resume", "stop"]
    assert _sent(record, "shutdown")  # q shuts the worker down cleanly


def test_copy_details_edit_and_scratchpad(tmp_path):
    record = tmp_path / "commands.jsonl"
    app = fake_app(record=record)

    async def scenario(pilot):
        await _start(pilot)
        elites = app.query_one(ElitesPane)
        await pilot.press("c")
        assert app.clipboard == elites.selected_elite.text == " Debian is a free operating system for servers"
        elites.table.focus()
        await pilot.press("down")  # the elites' cursor selects what d, c, e and f act on
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, EliteDetails), "the details")
        assert _plain(app.screen.details).startswith("elite 1 ")
        assert _plain(app.screen.details).splitlines()[1] == UI_PENALTY_SCALE  # what λ means, from `started`
        await pilot.press("escape")
        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.screen, PromptEditor), "the editor")
        assert app.screen.query_one("#prompt-editor").value == elites.elites[1].text
        app.screen.query_one("#prompt-editor").value = "Debian servers"
        await pilot.press("enter")
        await until(pilot, lambda: _sent(record, "inject"), "the injection")
        assert _sent(record, "inject")[-1]["text"] == "Debian servers"
        await pilot.press("t")
        await until(pilot, lambda: isinstance(app.screen, Scratchpad), "the scratchpad")
        await pilot.press(*"free")
        await until(pilot, lambda: app.screen.last_scored is not None, "the score")
        assert _sent(record, "score")[-1] == {**_sent(record, "score")[-1], "text": "free", "feature": 24}
        # the latent fires at 22.5 on BOS, which no text can change: the maximum is the text's own, as in `score`
        shown = _plain(app.screen.query_one("#scratch-result").content)
        assert "max act 1.000 · mean xent 2.000" in shown and "22.5" not in shown
        await pilot.press("escape")

    _run(app, scenario)


def test_the_scratchpad_lists_the_latents_firing_most_and_enter_chooses_one(tmp_path):
    record = tmp_path / "commands.jsonl"
    app = fake_app(record=record)

    async def scenario(pilot):
        await pilot.press("t")
        await until(pilot, lambda: isinstance(app.screen, Scratchpad), "the scratchpad")
        await pilot.press(*"free software")
        await until(pilot, lambda: app.screen.query_one("#scratch-top").option_count == 2, "the latents")
        assert _sent(record, "score")[-1]["top_features"] == 8
        options = app.screen.query_one("#scratch-top")
        shown = [str(options.get_option_at_index(i).prompt) for i in range(2)]
        # the fake worker: latents 7 (act 3.5) and 24 (1.0), both strongest on the first word
        assert shown == ["   3.5  #7      mentions of topic 7  on 'free'", "     1  #24     (no label)  on 'free'"]
        await pilot.press("down", "enter")
        await until(pilot, lambda: not isinstance(app.screen, Scratchpad), "the main screen")
        await until(pilot, lambda: app.chosen.index == 7, "latent 7 chosen")
        assert app.query_one(StatusBar).fields["label"] == "feature 7: mentions of topic 7"

    _run(app, scenario)


def test_details_show_each_token_with_its_activation(tmp_path):
    app = fake_app()

    async def scenario(pilot):
        await _start(pilot)
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, EliteDetails), "the details")
        text = _plain(app.screen.details)
        elite = app.query_one(ElitesPane).elites[0]
        assert "elite 0" in text and f"act {elite.act:.3g}"[:7] in text
        for pos, (token, act) in enumerate(zip(elite.tokens[1:], elite.activations[1:])):
            assert f"{pos} {token.strip()}" in " ".join(text.split()), (pos, token)
        await pilot.press("escape")

    _run(app, scenario)


def _plain(renderable) -> str:
    from rich.console import Console

    console = Console(width=100, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(renderable)
    return console.export_text()


def test_settings_apply_to_the_next_start(tmp_path):
    record = tmp_path / "commands.jsonl"
    app = fake_app(record=record)

    async def scenario(pilot):
        await pilot.press("S")
        await until(pilot, lambda: isinstance(app.screen, SearchSettings), "the form")
        field = app.screen.query_one("#" + SearchSettings.input_id("iterations"))
        field.value = "0"
        await pilot.pause(0.1)
        await pilot.press("ctrl+s")  # refused: the message stays in place
        assert isinstance(app.screen, SearchSettings)
        field.value = "40"
        await pilot.pause(0.1)
        await pilot.press("ctrl+s")
        await until(pilot, lambda: not isinstance(app.screen, SearchSettings), "the form to close")
        assert app.search_overrides == {"iterations": 40}
        await _start(pilot)

    _run(app, scenario)
    assert _sent(record, "start")[-1]["search"] == {"iterations": 40}


async def _import(pilot, app, export) -> None:
    """`i`, the export's path, enter."""
    await pilot.press("i")
    await until(pilot, lambda: isinstance(app.screen, PromptEditor), "the path prompt")
    app.screen.query_one("#prompt-editor").value = str(export)
    await pilot.press("enter")


def _notes(app, title: str) -> list:
    return [n for n in app._notifications if n.title == title]


def test_import_labels_shows_them_and_keeps_them_for_next_time(tmp_path):
    # the fake worker's SAE: Neuronpedia id demo/2-res, d_sae 40
    export = tmp_path / "export.jsonl.gz"
    write_explanations(export, [{"modelId": "demo", "layer": "2-res", "index": "7", "description": "rivers"},
                                {"modelId": "demo", "layer": "2-res", "index": "9999", "description": "gone"}])
    app = fake_app()

    async def scenario(pilot):
        await _import(pilot, app, export)
        pane = app.query_one(FeaturePane)
        await until(pilot, lambda: pane.entries[7].label == "rivers", "the label")
        await pilot.press("slash", *"rivers", "enter")
        assert [e.index for e in pane.shown] == [7]
        [note] = _notes(app, "labels imported")
        assert note.message == ("1 of 1 labels match this SAE's features; kept for next time\n"
                                "skipped 1 explanation for latents past d_sae=40")
        assert note.severity == "warning"

    _run(app, scenario)
    assert labels.read_imported("demo/model|demo/sae") == {7: "rivers"}
    again = fake_app()

    async def reopened(pilot):  # a new UI on the same SAE shows the imported label at once
        assert again.query_one(FeaturePane).entries[7].label == "rivers"

    _run(again, reopened)


def test_import_of_an_activations_export_shows_the_dataset_at_once(tmp_path):
    from epo_tui.tui.components.dataset import DatasetPane
    from epo_tui.tui.components.frontier import FrontierPane

    folder = tmp_path / "v1" / "demo" / "2-res" / "activations"
    folder.mkdir(parents=True)
    (folder / "batch-0.jsonl").write_text(json.dumps(
        {"modelId": "demo", "layer": "2-res", "index": "24", "tokens": [" the", " Debian", " way"],
         "values": [0.0, 3.0, 0.5], "maxValue": 3.0, "maxValueTokenIndex": 1}) + "\n")
    app = fake_app()

    async def scenario(pilot):
        assert not app.query_one(DatasetPane).display
        await _import(pilot, app, folder.parent)  # the export's folder, as downloaded
        await until(pilot, lambda: app.query_one(DatasetPane).display, "the dataset pane")
        [note] = _notes(app, "dataset statistics imported")
        assert note.message == "statistics of 1 latent, 1 example; kept for next time"
        assert app.query_one(FrontierPane).dataset_max == 3.0
        lines = [line.plain for line in app.query_one(DatasetPane).lines()]
        assert lines[0].startswith("latent 24: dataset max 3") and "3  the Debian way" in lines[1]

    _run(app, scenario)


def test_import_takes_a_non_empty_and_the_best_scored_explanation(tmp_path):
    export = tmp_path / "export.jsonl"
    write_explanations(export, [
        {"modelId": "demo", "layer": "2-res", "index": "3", "description": ""},
        {"modelId": "demo", "layer": "2-res", "index": "3", "description": "French words"},
        {"modelId": "demo", "layer": "2-res", "index": "5", "description": "a guess", "scores": [{"value": 0.05}]},
        {"modelId": "demo", "layer": "2-res", "index": "5", "description": "Python code", "scores": [{"value": 0.9}]},
    ])
    app = fake_app()

    async def scenario(pilot):
        await _import(pilot, app, export)
        pane = app.query_one(FeaturePane)
        await until(pilot, lambda: _notes(app, "labels imported"), "the import")
        assert (pane.entries[3].label, pane.entries[5].label) == ("French words", "Python code")
        assert _notes(app, "labels imported")[0].message.endswith("\nignored 1 empty explanation")

    _run(app, scenario)
    assert labels.read_imported("demo/model|demo/sae") == {3: "French words", 5: "Python code"}


def test_import_of_an_export_for_another_layer_is_refused_in_one_notification(tmp_path):
    export = tmp_path / "layer8.jsonl.gz"
    write_explanations(export, [{"modelId": "demo", "layer": "8-res", "index": str(i), "description": f"l8 {i}"}
                                for i in range(40)])
    app = fake_app()

    async def scenario(pilot):
        before = [e.label for e in app.query_one(FeaturePane).entries]
        await _import(pilot, app, export)
        await until(pilot, lambda: _notes(app, "not imported"), "the refusal")
        await pilot.pause(0.2)
        [refusal] = _notes(app, "not imported")
        assert refusal.message == f"{export}: an export for demo/8-res, not for this SAE (demo/2-res): not imported"
        assert refusal.severity == "error" and not _notes(app, "labels imported")
        assert [e.label for e in app.query_one(FeaturePane).entries] == before

    _run(app, scenario)
    assert not labels.imported_labels_path("demo/model|demo/sae").exists()  # nothing kept for next time


def test_import_for_an_sae_without_a_neuronpedia_id_is_applied_and_said_unchecked(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_NEURONPEDIA_ID", "")  # the worker's SAE has none
    export = tmp_path / "export.jsonl"
    write_explanations(export, [{"modelId": "demo", "layer": "8-res", "index": "7", "description": "rivers"}])
    app = fake_app()

    async def scenario(pilot):
        await _import(pilot, app, export)
        await until(pilot, lambda: _notes(app, "labels imported"), "the import")
        assert app.query_one(FeaturePane).entries[7].label == "rivers"
        assert _notes(app, "labels imported")[0].message.endswith(
            "\nnot checked against the SAE: it has no Neuronpedia id (it names demo/8-res)")

    _run(app, scenario)


def test_import_of_a_bad_file_is_one_error_and_changes_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"index": "3", "description": "ok"}\nnot json\n')
    app = fake_app()

    async def scenario(pilot):
        before = [e.label for e in app.query_one(FeaturePane).entries]
        await pilot.press("i")
        await until(pilot, lambda: isinstance(app.screen, PromptEditor), "the path prompt")
        app.screen.query_one("#prompt-editor").value = str(bad)
        await pilot.press("enter")
        await until(pilot, lambda: any("line 2" in str(n.message) for n in app._notifications), "the error")
        assert [e.label for e in app.query_one(FeaturePane).entries] == before

    _run(app, scenario)


def _saved_session(features: list[int], status: str, iteration: int, total: int) -> sessions.Session:
    elites = [{"penalty": 1.0, "token_ids": [0, 1, 2], "tokens": ["<|endoftext|>", " saved", " prompt"],
               "activations": [0.0, 0.5, 2.5], "prompt_start": 1, "act": 2.5, "xent": 4.0, "objective": 2.5,
               "text": " saved prompt"}]
    session = sessions.create_session({"model": "demo/model", "sae": {"name": "demo/sae", "hook": "h"},
                                       "feature": {"indices": features}, "label": "saved search",
                                       "iterations_total": total, "config": {}, "lambdas": [1.0]})
    session.write_checkpoint({"x": np.zeros(2, np.float32)}, iteration, elites)
    session.append_history([{"iteration": 1, "xent": 4.0, "objective": 2.5, "act": 2.5, "token_ids": [1, 2],
                             "text": " saved prompt"}])
    session.update_meta(status=status, iteration=iteration)
    return session


def test_sessions_open_shows_saved_results_and_favorites_work_on_them(tmp_path):
    session = _saved_session([31], "stopped", 3, 10)
    app = fake_app()

    async def scenario(pilot):
        await pilot.press("o")
        await until(pilot, lambda: isinstance(app.screen, SessionsScreen) and app.screen.loaded, "the sessions")
        await pilot.press("enter")
        elites = app.query_one(ElitesPane)
        await until(pilot, lambda: elites.elites and elites.elites[0].text == " saved prompt", "the saved elites")
        assert len(app.query_one(FrontierPane).frontier) == 1
        await pilot.press("f")
        path = favorites.favorites_path(app.config)
        await until(pilot, lambda: path.exists(), "the favorite")
        assert session.id in path.read_text() and "Feature 31" in path.read_text()

    _run(app, scenario)


def test_sessions_resume_sends_the_session_and_more_iterations_for_a_finished_one(tmp_path):
    record = tmp_path / "commands.jsonl"
    stopped = _saved_session([31], "stopped", 3, 10)
    app = fake_app(record=record)

    async def scenario(pilot):
        await pilot.press("o")
        await until(pilot, lambda: isinstance(app.screen, SessionsScreen) and app.screen.loaded, "the sessions")
        await pilot.press("r")
        await until(pilot, lambda: app.session is not None and app.session.session == stopped.id, "the resume")

    _run(app, scenario)
    # the session resumes with its own total: no `iterations` is sent
    assert _sent(record, "resume")[-1] == {"v": 1, "type": "resume", "id": _sent(record, "resume")[-1]["id"],
                                           "session": stopped.id}

    finished = _saved_session([32], "finished", 10, 10)  # newest: the browser's first row
    app = fake_app(record=record)

    async def again(pilot):
        await pilot.press("o")
        await until(pilot, lambda: isinstance(app.screen, SessionsScreen) and app.screen.loaded, "the sessions")
        await pilot.press("r")
        await until(pilot, lambda: app.session is not None, "the resume")

    _run(app, again)
    last = _sent(record, "resume")[-1]
    assert last["session"] == finished.id and last["iterations"] == 10 + app.config.search.iterations


def test_the_palette_holds_every_action():
    app = fake_app()

    async def scenario(pilot):
        titles = {c.title for c in app.get_system_commands(app.screen)}
        for binding in app.BINDINGS + FeaturePane.BINDINGS:
            assert any(binding.description in t for t in titles), binding.description
        await pilot.press("ctrl+p")
        await until(pilot, lambda: app.screen.__class__.__name__ == "CommandPalette", "the palette")
        await pilot.press(*"sessions", "enter")
        await until(pilot, lambda: isinstance(app.screen, SessionsScreen), "the sessions screen from the palette")
        await pilot.press("escape")

    _run(app, scenario)


@pytest.mark.parametrize("index, heading", [(25, "## Feature 25: mentions of topic 25"), (24, "## Feature 24")])
def test_a_favorites_heading_carries_the_features_label(index, heading):
    """The heading names the feature's interpretation from the worker's labels, never the status text
    ("Feature 48: feature 48" before), and only the number when the feature has no label."""
    import dataclasses

    from epo_tui.config import Config, FeatureConfig

    app = fake_app(config=dataclasses.replace(Config(), feature=FeatureConfig(index=index)))

    async def scenario():
        async with app.run_test(size=SIZE) as pilot:
            await search_until(pilot, 5)  # the fake worker's last iteration
            await pilot.press("f")
            path = favorites.favorites_path(app.config)
            await until(pilot, lambda: path.exists() and favorites.read_favorites(path), "the favorite")
            await pilot.press("q")
        return path.read_text()

    text = asyncio.run(scenario())
    assert [line for line in text.splitlines() if line.startswith("## ")] == [heading]


@pytest.mark.parametrize("key", ["question_mark", "f1"])
def test_help_lists_every_key_of_every_screen_and_closes(key):
    import io

    from rich.console import Console

    from epo_tui.tui.app import EpoApp
    from epo_tui.tui.screens.help import HelpScreen

    app = fake_app()

    async def scenario():
        async with app.run_test(size=(120, 60)) as pilot:
            await ready(pilot)
            await pilot.press(key)
            await until(pilot, lambda: isinstance(app.screen, HelpScreen), "the help screen")
            console = Console(width=120, record=True, file=io.StringIO())
            console.print(app.screen.keys_table())  # what the screen's #help-keys shows
            text = console.export_text()
            await pilot.press(key)  # the same key closes it
            await until(pilot, lambda: not isinstance(app.screen, HelpScreen), "the main screen")
        return text

    text = asyncio.run(scenario())
    for binding in [*EpoApp.BINDINGS, *FeaturePane.BINDINGS, *SessionsScreen.BINDINGS, *SearchSettings.BINDINGS]:
        if binding.description:
            assert binding.description in text, binding
    for heading in ("main screen", "feature list", "sessions browser (o)", "search settings (S)", "scratchpad (t)"):
        assert heading in text
