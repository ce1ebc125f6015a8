"""The search settings form, driven by a pilot in an 80x24 terminal: messages appear under the field
they concern as you type, apply is refused while any is shown, and a valid form dismisses with exactly
the changed [search] keys, typed."""

from __future__ import annotations

import asyncio
import dataclasses

from textual.app import App
from textual.widgets import Input, Static

from epo_tui.config import Config, SearchConfig, field_help
from epo_tui.tui.screens.settings import (EXCLUDED_FIELDS, SearchSettings, escape_text, setting_fields,
                                  unescape_text)

NOT_DISMISSED = object()


class Host(App):
    """Pushes the form at start and keeps what it dismissed with."""

    def __init__(self, settings: SearchSettings):
        super().__init__()
        self.settings = settings
        self.result = NOT_DISMISSED

    def on_mount(self) -> None:
        self.push_screen(self.settings, self.dismissed)

    def dismissed(self, result) -> None:
        self.result = result


def run_form(scenario, config: Config | None = None, overrides: dict | None = None):
    """Runs `scenario(pilot, screen, host)` against the form in an 80x24 terminal; returns the host."""
    host = Host(SearchSettings(config or Config(), overrides))

    async def main():
        async with host.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            await scenario(pilot, host.settings, host)

    asyncio.run(main())
    return host


def field(screen: SearchSettings, name: str) -> Input:
    return screen.query_one(f"#{SearchSettings.input_id(name)}", Input)


def message(screen: SearchSettings, name: str) -> str:
    """The message under a field, '' when none is shown."""
    error = screen.query_one(f"#{SearchSettings.error_id(name)}", Static)
    return str(error.render()).strip() if error.has_class("-shown") else ""


async def type_into(pilot, screen: SearchSettings, name: str, text: str) -> None:
    """Clears a field with the keyboard and types `text`, as a user would."""
    field(screen, name).focus()
    await pilot.press("end", "ctrl+u", *text)
    await pilot.pause()


# -- the field list


def test_every_search_field_is_in_the_form_or_excluded_with_a_reason():
    all_names = [f.name for f in dataclasses.fields(SearchConfig)]
    form_names = [spec.name for spec in setting_fields()]
    assert not set(form_names) & set(EXCLUDED_FIELDS)
    assert sorted(form_names + list(EXCLUDED_FIELDS)) == sorted(all_names)
    assert all(EXCLUDED_FIELDS.values())
    # every key's help is written once, in the config schema, and the form shows it
    assert all(field_help("search", name) for name in all_names)
    assert {spec.name: spec.help for spec in setting_fields()} == {n: field_help("search", n) for n in form_names}
    assert field_help("search", "candidates") == "candidates proposed and scored per elite per iteration"


def test_fields_take_their_limits_from_the_config_metadata():
    specs = {spec.name: spec for spec in setting_fields()}
    assert (specs["iterations"].kind, specs["iterations"].allowed) == (int, "an integer ≥ 1")
    assert specs["skip_gradient_mask"].allowed == "a number from 0.0 to 1.0"
    assert (specs["prefix"].kind, specs["prefix"].validators()) == (str, [])
    assert specs["penalty_scale"].allowed == "one of: auto, measured, none"


def test_a_field_with_choices_takes_only_them_and_applies_one():
    async def scenario(pilot, screen, host):
        await type_into(pilot, screen, "penalty_scale", "dataset")
        assert message(screen, "penalty_scale") == "must be one of: auto, measured, none"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert host.result is NOT_DISMISSED
        await type_into(pilot, screen, "penalty_scale", "none")
        assert message(screen, "penalty_scale") == ""
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert host.result == {"penalty_scale": "none"}

    run_form(scenario)


def test_text_escapes_round_trip():
    for text in ["", "<start_of_turn>user\n", "a\\nb", "tab\there", "C:\\path", "end\\"]:
        assert unescape_text(escape_text(text)) == text
    assert escape_text("user\n") == "user\\n"
    assert unescape_text("C:\\path") == "C:\\path"  # an unknown escape stays as typed


# -- the form


def test_text_in_an_integer_field_shows_a_message_and_apply_is_refused():
    async def scenario(pilot, screen, host):
        assert all(message(screen, spec.name) == "" for spec in setting_fields())
        await type_into(pilot, screen, "iterations", "abc")
        assert message(screen, "iterations") == "must be an integer ≥ 1"
        assert field(screen, "iterations").has_class("-invalid")
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert host.result is NOT_DISMISSED and host.screen is screen
        assert "fix the fields" in str(screen.query_one("#settings-form-error", Static).render())
        assert screen.focused is field(screen, "iterations")

    run_form(scenario)


def test_a_config_error_outside_the_form_shows_below_it():
    async def scenario(pilot, screen, host):
        form_error = screen.query_one("#settings-form-error", Static)
        assert form_error.has_class("-shown") and "search.banned_tokens" in str(form_error.render())
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert host.result is NOT_DISMISSED

    run_form(scenario, overrides={"banned_tokens": "not a list"})


def test_values_outside_the_limits_show_the_limit():
    async def scenario(pilot, screen, host):
        await type_into(pilot, screen, "elites", "0")
        assert message(screen, "elites") == "must be an integer ≥ 1"
        await type_into(pilot, screen, "swap", "1.5")
        assert message(screen, "swap") == "must be a number from 0.0 to 1.0"
        await type_into(pilot, screen, "swap", "nan")  # the limits alone would let nan through
        assert message(screen, "swap") == "must be a number from 0.0 to 1.0"
        await type_into(pilot, screen, "swap", "0.5")
        assert message(screen, "swap") == ""
        assert message(screen, "elites") == "must be an integer ≥ 1"  # still shown, still refused
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert host.result is NOT_DISMISSED

    run_form(scenario)


def test_cross_field_message_then_fixed_and_applied_with_the_changed_keys():
    async def scenario(pilot, screen, host):
        await type_into(pilot, screen, "penalty_max", "0.5")  # below penalty_min (1.0)
        assert "larger than search.penalty_max" in message(screen, "penalty_min")
        assert message(screen, "penalty_max") == ""
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert host.result is NOT_DISMISSED
        await type_into(pilot, screen, "penalty_max", "5")
        assert message(screen, "penalty_min") == ""
        await type_into(pilot, screen, "iterations", "40")
        await pilot.press("ctrl+s")
        await pilot.pause()

    host = run_form(scenario)
    assert host.result == {"iterations": 40, "penalty_max": 5.0}
    assert [type(v) for v in host.result.values()] == [int, float]


def test_config_checks_beyond_the_field_limits_show_under_their_field():
    async def scenario(pilot, screen, host):
        await type_into(pilot, screen, "penalty_min", "0")  # >= 0 by the limits, > 0 by config_from_data
        assert message(screen, "penalty_min").startswith("must be > 0")
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert host.result is NOT_DISMISSED

    run_form(scenario)


def test_escape_cancels():
    async def scenario(pilot, screen, host):
        await type_into(pilot, screen, "iterations", "40")
        await pilot.press("escape")
        await pilot.pause()

    assert run_form(scenario).result is None


def test_overrides_prefill_and_reset_goes_back_to_the_config():
    config = Config(search=SearchConfig(prefix="<start_of_turn>user\n"))
    overrides = {"elites": 4, "banned_tokens": ["a,b"], "not_a_key": 1}

    async def scenario(pilot, screen, host):
        assert field(screen, "elites").value == "4"
        assert field(screen, "prefix").value == "<start_of_turn>user\\n"
        assert screen.changes() == {"elites": 4, "banned_tokens": ("a,b",)}  # excluded keys carried over
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert field(screen, "elites").value == "8"
        await pilot.press("ctrl+s")
        await pilot.pause()

    assert run_form(scenario, config, overrides).result == {}


def test_enter_moves_to_the_next_field_and_applies_on_the_last():
    async def scenario(pilot, screen, host):
        names = [spec.name for spec in setting_fields()]
        await type_into(pilot, screen, names[0], "40")
        await pilot.press("enter")
        await pilot.pause()
        assert screen.focused is field(screen, names[1]) and host.result is NOT_DISMISSED
        field(screen, names[-1]).focus()
        await pilot.pause()
        await pilot.press("enter")
        await pilot.pause()

    assert run_form(scenario).result == {"iterations": 40}


def test_every_field_is_reachable_by_tab_and_scrolled_into_view_at_80x24():
    async def scenario(pilot, screen, host):
        scroll = screen.query_one("#settings-fields")
        assert scroll.region.bottom <= 24  # the form itself fits; its fields scroll inside it
        for spec in setting_fields():
            assert screen.focused is field(screen, spec.name), spec.name
            await pilot.pause()
            region = field(screen, spec.name).region
            assert region.height == 1 and scroll.region.contains_region(region), spec.name
            await pilot.press("tab")
        assert host.screen is screen

    run_form(scenario)


def test_time_budget_is_checked_in_place_and_round_trips_into_the_config():
    from epo_tui.config import config_from_data

    config = Config(search=SearchConfig(time_budget="2m"))

    async def scenario(pilot, screen, host):
        assert field(screen, "time_budget").value == "2m"
        await type_into(pilot, screen, "time_budget", "soon")
        assert message(screen, "time_budget").startswith("expected a duration such as 90, 90s, 2m, 1m30s or 1h")
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert host.result is NOT_DISMISSED
        await type_into(pilot, screen, "time_budget", "1m30s")
        assert message(screen, "time_budget") == ""
        await pilot.press("ctrl+s")
        await pilot.pause()

    host = run_form(scenario, config)
    assert host.result == {"time_budget": "1m30s"}
    data = config.to_dict()  # what the worker's start command validates (session_search.with_overrides)
    data["search"].update(host.result)
    assert config_from_data(data).search.time_budget == "1m30s"
