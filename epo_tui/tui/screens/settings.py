"""The search settings form (`S`): one labelled input per [search] key, validated as you type.

The form is generated from `SearchConfig`'s dataclass fields: their types choose the parser and their
metadata limits (`_limits(minimum=..., maximum=...)`) the Textual validators, so the form and a config
file accept the same values. Validation has two layers:

1. per field, on every keystroke: Textual's `Integer` / `Number` validators on each `Input` (type and
   limits), their message shown right under the field;
2. the whole config, whenever every field parses: `config_from_data` on the full config with the
   edited [search] section (it is the final truth, e.g. penalty_min <= penalty_max and penalty_min > 0);
   its message goes under the field it names, or below the form when it names no field of the form.

`ctrl+s` (or enter on the last field) dismisses with the [search] keys whose values differ from
`config.search`, typed as the config types them; it is refused while any message is shown.
`escape` dismisses with None; `ctrl+r` puts the config's values back.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.validation import Function, Integer, Number, Validator
from textual.widgets import Input, Label, Static

from epo_tui.config import Config, SearchConfig, config_from_data, field_help
from epo_tui.errors import UserError

SOURCE = "settings"  # what config_from_data's messages name as their source (stripped before display)

# [search] fields the form leaves alone, with why. An override of one of them is carried through.
EXCLUDED_FIELDS: dict[str, str] = {
    "banned_tokens": "a list of token strings, and a token may itself contain a comma or a space, "
                     "so one line of text cannot hold it unambiguously; set it in the config file",
}

_SCALAR_TYPES = (int, float, str)


@dataclass(frozen=True)
class SettingField:
    """One editable [search] key: its type and limits, read from SearchConfig."""

    name: str
    kind: type  # int, float or str
    minimum: float | None
    maximum: float | None
    help: str
    choices: tuple[str, ...] = ()  # a str field that takes one of these only

    @property
    def allowed(self) -> str:
        """What the field accepts, e.g. 'an integer ≥ 1', 'a number from 0.0 to 1.0' or 'one of: a, b'."""
        if self.choices:
            return "one of: " + ", ".join(self.choices)
        noun = {int: "an integer", float: "a number", str: "any text"}[self.kind]
        if self.minimum is not None and self.maximum is not None:
            return f"{noun} from {self.minimum} to {self.maximum}"
        if self.minimum is not None:
            return f"{noun} ≥ {self.minimum}"
        if self.maximum is not None:
            return f"{noun} ≤ {self.maximum}"
        return noun

    def validators(self) -> list[Validator]:
        """Textual's validators for the type and the config's limits; one message for every failure."""
        message = f"must be {self.allowed}"
        if self.kind is int:
            return [Integer(self.minimum, self.maximum, failure_description=message)]
        if self.kind is float:  # Number also refuses nan and inf, which the limits would let through
            return [Number(self.minimum, self.maximum, failure_description=message)]
        if self.choices:
            return [Function(lambda text: text.strip() in self.choices, failure_description=message)]
        return []

    def show(self, value: Any) -> str:
        """A config value as the text the input starts with."""
        if self.kind is str:
            return escape_text(str(value))
        return repr(value) if isinstance(value, float) else str(value)

    def parse(self, text: str) -> Any:
        """The input's text as the field's type; call only once the validators accepted it."""
        if self.kind is int:
            return int(text.strip())
        if self.kind is float:
            return float(text.strip())
        return text.strip() if self.choices else unescape_text(text)


def setting_fields() -> list[SettingField]:
    """The form's fields, in SearchConfig's order: every scalar field not in EXCLUDED_FIELDS."""
    hints = typing.get_type_hints(SearchConfig)
    fields = []
    for spec in dataclasses.fields(SearchConfig):
        kind = hints[spec.name]
        if spec.name in EXCLUDED_FIELDS or kind not in _SCALAR_TYPES:
            continue
        fields.append(SettingField(spec.name, kind, spec.metadata.get("min"), spec.metadata.get("max"),
                                   field_help("search", spec.name), tuple(spec.metadata.get("choices") or ())))
    return fields


# A one-line Input cannot hold a newline (a prefix such as "<start_of_turn>user\n" has one), so text
# fields show \n, \t, \r and \\ as escapes and read them back.
_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
_UNESCAPES = {escaped[1]: plain for plain, escaped in _ESCAPES.items()}


def escape_text(text: str) -> str:
    return "".join(_ESCAPES.get(char, char) for char in text)


def unescape_text(text: str) -> str:
    # an unknown escape such as "\p" stays as typed, so a Windows-like path survives
    return re.sub(r"\\(.)", lambda m: _UNESCAPES.get(m.group(1), m.group(0)), text)


def _config_message(err: UserError) -> tuple[str, str]:
    """(key, message) of a config error, without the 'source: key: ' prefix it starts with."""
    key = getattr(err, "key", "")
    text = str(err).removeprefix(f"{SOURCE}: ")
    return key, text.removeprefix(f"{key}: ") if key else text


class SearchSettings(ModalScreen[dict | None]):
    """Edit the [search] parameters of the next search; dismisses with the changed keys, or None."""

    DEFAULT_CSS = """
    SearchSettings { align: center middle; }
    SearchSettings > Vertical {
        width: 100%; max-width: 100; height: 100%; max-height: 48;
        border: round $primary; background: $surface; padding: 0 1;
    }
    SearchSettings #settings-fields { height: 1fr; }
    SearchSettings .setting { height: auto; margin-bottom: 1; }
    SearchSettings .setting-row { height: 1; }
    SearchSettings .setting-name { width: 20; }
    SearchSettings .setting-row Input { width: 1fr; }
    SearchSettings .setting-help { color: $text-muted; }
    SearchSettings .setting-error { color: $text-error; display: none; }
    SearchSettings .setting-error.-shown { display: block; }
    SearchSettings #settings-form-error { color: $text-error; display: none; }
    SearchSettings #settings-form-error.-shown { display: block; }
    SearchSettings #settings-keys { color: $text-muted; }
    """
    AUTO_FOCUS = "Input"
    BINDINGS = [
        Binding("ctrl+s", "apply", "Apply", priority=True, id="settings.apply"),
        Binding("escape", "cancel", "Cancel", priority=True, id="settings.cancel"),
        Binding("ctrl+r", "reset", "Reset to config", priority=True, id="settings.reset"),
    ]

    def __init__(self, config: Config, overrides: dict[str, Any] | None = None):
        super().__init__()
        self.config = config
        self.form_fields = setting_fields()
        # only [search] keys: an unknown key (a stale override) would make every apply fail
        known = {spec.name for spec in dataclasses.fields(SearchConfig)}
        self.overrides = {k: v for k, v in (overrides or {}).items() if k in known}
        self.problems: dict[str, str] = {}  # field name -> the message under it
        self.form_problem = ""  # a config error that names no field of the form
        self.validated: SearchConfig | None = None  # the edited section, once everything validates

    # -- layout

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"search settings ({self.config.source})", markup=False)
            with VerticalScroll(id="settings-fields"):
                for spec in self.form_fields:
                    start = self.overrides.get(spec.name, getattr(self.config.search, spec.name))
                    with Vertical(classes="setting"):
                        with Horizontal(classes="setting-row"):
                            yield Label(spec.name, classes="setting-name", markup=False)
                            yield Input(spec.show(start), id=self.input_id(spec.name), compact=True,
                                        validators=spec.validators(), validate_on=["changed"])
                        yield Static("", id=self.error_id(spec.name), classes="setting-error", markup=False)
                        yield Static(spec.help, classes="setting-help", markup=False)
            yield Static("", id="settings-form-error", markup=False)
            yield Label("ctrl+s apply · escape cancel · ctrl+r reset to config · tab next field",
                        id="settings-keys")

    @staticmethod
    def input_id(name: str) -> str:
        return f"setting-{name}"

    @staticmethod
    def error_id(name: str) -> str:
        return f"setting-error-{name}"

    def on_mount(self) -> None:
        self.check()  # an override from before may already be out of range

    # -- validation

    @on(Input.Changed)
    def changed(self, event: Input.Changed) -> None:
        event.stop()
        self.check()

    def check(self) -> bool:
        """Validates every field and then the whole config, shows the messages; True when all is valid."""
        problems: dict[str, str] = {}
        values: dict[str, Any] = {}
        for spec in self.form_fields:
            field_input = self.query_one(f"#{self.input_id(spec.name)}", Input)
            text = field_input.value
            result = field_input.validate(text)
            if result is not None and not result.is_valid:
                problems[spec.name] = result.failure_descriptions[0]
            else:
                values[spec.name] = spec.parse(text)
        self.form_problem = ""
        self.validated = None
        if not problems:  # cross-field checks need every value, so they wait until all fields parse
            self._check_config(values, problems)
        self.problems = problems
        self._show_problems()
        return not problems and not self.form_problem

    def _check_config(self, values: dict[str, Any], problems: dict[str, str]) -> None:
        data = self.config.to_dict()
        data["search"] = {**data["search"], **self.overrides, **values}
        try:
            self.validated = config_from_data(data, SOURCE).search
        except UserError as err:
            key, message = _config_message(err)
            name = key.removeprefix("search.")
            if key.startswith("search.") and name in values:  # a field of the form
                problems[name] = message
            else:
                self.form_problem = f"{key}: {message}" if key else message

    def _show_problems(self) -> None:
        for spec in self.form_fields:
            message = self.problems.get(spec.name, "")
            error = self.query_one(f"#{self.error_id(spec.name)}", Static)
            error.update(message)
            error.set_class(bool(message), "-shown")
            # a message from config_from_data is not the Input's own: mark the field invalid too (the
            # Inputs validate on change only, so a blur does not clear this mark)
            self.query_one(f"#{self.input_id(spec.name)}", Input).set_class(bool(message), "-invalid")
        form_error = self.query_one("#settings-form-error", Static)
        form_error.update(self.form_problem)
        form_error.set_class(bool(self.form_problem), "-shown")

    def changes(self) -> dict[str, Any]:
        """The [search] keys whose validated values differ from the config's (empty until valid)."""
        if self.validated is None:
            return {}
        return {spec.name: getattr(self.validated, spec.name) for spec in dataclasses.fields(SearchConfig)
                if getattr(self.validated, spec.name) != getattr(self.config.search, spec.name)}

    # -- keys

    @on(Input.Submitted)
    def submitted(self, event: Input.Submitted) -> None:
        event.stop()
        last = self.input_id(self.form_fields[-1].name)
        if event.input.id == last:
            self.action_apply()
        else:
            self.focus_next()

    def action_apply(self) -> None:
        if self.check():
            self.dismiss(self.changes())
            return
        self.app.bell()
        if not self.form_problem:  # the next keystroke's check() replaces this line
            form_error = self.query_one("#settings-form-error", Static)
            form_error.update("not applied: fix the fields with a message first")
            form_error.add_class("-shown")
        first_bad = next((spec.name for spec in self.form_fields if spec.name in self.problems), None)
        if first_bad is not None:  # bring the first message into view
            self.query_one(f"#{self.input_id(first_bad)}", Input).focus()

    def action_cancel(self) -> None:
        self.dismiss(None)

    def action_reset(self) -> None:
        """Puts the config's own values back (the overrides the form started with are dropped)."""
        self.overrides = {}
        for spec in self.form_fields:
            self.query_one(f"#{self.input_id(spec.name)}", Input).value = spec.show(
                getattr(self.config.search, spec.name))
        self.check()
