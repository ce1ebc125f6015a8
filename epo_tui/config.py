"""The user's configuration: TOML (tomli) into frozen dataclasses, validated at load.

Lookup order: `--config PATH`, `--config sample:NAME` (a shipped sample), the user's
`config.toml` in the platformdirs config folder, else the built-in defaults (GPT-2 small with
`gpt2-small-res-jb`). Every error names the file and key, what was found and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli

from epo_tui import paths
from epo_tui.budget import budget_seconds
from epo_tui.errors import ConfigError, UserError, did_you_mean

DTYPES = ("auto", "float32", "bfloat16")  # auto: engine/language_model.py resolve_dtype
INT_MIN, INT_MAX = -(2**63), 2**63 - 1  # TOML's integers (seeds reach jax.random.key as int64)
BUILTIN_SOURCE = "built-in defaults"


def _limits(minimum: float | None = None, maximum: float | None = None, choices=None, help: str = "") -> dict:  # noqa: A002
    """A field's metadata: its limits (checked on load) and its one-line help."""
    return {"min": minimum, "max": maximum, "choices": choices, "help": help}


@dataclass(frozen=True)
class ModelConfig:
    name: str | None = "gpt2"  # Hugging Face hub id
    path: str | None = None  # or a local checkpoint directory
    # "auto": bfloat16 on GPUs and TPUs, float32 on CPUs (where XLA's bfloat16 dots measured slower)
    dtype: str = field(default="auto", metadata=_limits(choices=DTYPES))
    # devices that split each layer's weights (heads, MLP width): "auto" picks the fewest that hold the
    # model (1 where the devices do not report their memory, as on CPU); the rest split the candidates
    model_parallel: int | str = "auto"


@dataclass(frozen=True)
class SAEConfig:
    release: str | None = "gpt2-small-res-jb"  # sae-lens registry release
    id: str | None = "blocks.8.hook_resid_pre"  # SAE id within the release
    path: str | None = None  # or a local sae-lens directory
    # a Neuronpedia explanations export (.jsonl or .jsonl.gz) whose descriptions label the features
    labels: str | None = None


TARGET_KINDS = ("sae", "direction", "neuron", "logit", "vector")
COMBINES = ("lp", "min", "sum", "contrast")
READS = ("last", "max")
PENALTY_SCALES = ("auto", "measured", "none")  # search.penalty_scale: engine/penalty_scale.py


@dataclass(frozen=True)
class FeatureConfig:
    """What the search maximizes."""

    index: int = field(default=234, metadata=_limits(minimum=0))
    # several at once (overrides index): combined by `combine`
    indices: tuple[int, ...] = field(default=(), metadata=_limits(minimum=0))
    # sae: the latent's pre-activation (true activation reported); direction: residual . unit decoder
    # row; neuron: an MLP neuron at `hook`; logit: a token's logit; vector: residual at `hook` . vector
    kind: str = field(default="sae", metadata=_limits(choices=TARGET_KINDS))
    combine: str = field(default="lp", metadata=_limits(choices=COMBINES))
    lp_p: float = field(default=0.1, metadata=_limits(minimum=0.001))  # the seed's L_0.1
    lp_offset: float = 4.0  # relu(a + offset) gives negative activations a gradient
    read: str = field(default="last", metadata=_limits(choices=READS))  # last optimized token, or max
    hook: str = ""  # for neuron / vector: e.g. "blocks.5.mlp.hook_post"
    vector: str = ""  # for vector: a .npy file of d_model floats

    @property
    def features(self) -> tuple[int, ...]:
        return self.indices or (self.index,)


@dataclass(frozen=True)
class SearchConfig:
    """How the search runs. Each field's `help` (its metadata) is its one description: the settings form,
    `--help` and the samples' comments read it (field_help)."""

    iterations: int = field(default=750, metadata=_limits(minimum=1, help="how many iterations the search runs"))
    time_budget: str = field(default="", metadata=_limits(
        help="stop after this much wall clock, set-up included (90s, 2m, 1m30s, 1h; empty: none): "
             "whichever of it and iterations comes first"))
    elites: int = field(default=8, metadata=_limits(minimum=1, help="prompts kept per iteration, one per penalty λ"))
    candidates: int = field(default=128, metadata=_limits(
        minimum=1, help="candidates proposed and scored per elite per iteration"))
    prompt_tokens: int = field(default=20, metadata=_limits(
        minimum=1, help="tokens optimized after BOS and the prefix"))
    penalty_min: float = field(default=1.0, metadata=_limits(
        minimum=0.0, help="smallest fluency penalty λ (λ log-spaced up to penalty_max)"))
    penalty_max: float = field(default=20.0, metadata=_limits(minimum=0.0, help="largest fluency penalty λ"))
    penalty_scale: str = field(default="auto", metadata=_limits(choices=PENALTY_SCALES, help=(
        "what λ's nat is weighed against: 'auto' = the feature's dataset maximum where known (epo-tui import "
        "or dataset), else three standard deviations of its value over the model's own text, so λ = 1 "
        "prices a nat at a tenth of that on every SAE; 'measured' = always the latter; 'none' = the "
        "feature's raw units")))
    topk: int = field(default=128, metadata=_limits(minimum=1, help="tokens per position kept by the gradient mask"))
    seed: int = field(default=0, metadata=_limits(minimum=0, help="random seed: the same seed repeats the same search"))
    prefix: str = field(default="", metadata=_limits(
        help='text placed after BOS (e.g. "<start_of_turn>user\\n"), or "chat": the chat template\'s user turn'))
    # proposal augmentations (DESIGN.md §3), each with its probability
    extra_resample: float = field(default=1.5, metadata=_limits(
        minimum=0.0, help="expected number of extra positions resampled per candidate"))
    skip_gradient_mask: float = field(default=0.2, metadata=_limits(
        minimum=0.0, maximum=1.0, help="probability a candidate ignores the gradient mask"))
    swap: float = field(default=0.1, metadata=_limits(
        minimum=0.0, maximum=1.0, help="probability a candidate also swaps two positions"))
    temperature_max: float = field(default=2.0, metadata=_limits(
        minimum=0.01, help="proposal temperature is drawn from U(0, temperature_max)"))
    unmasked_top: int = field(default=1024, metadata=_limits(
        minimum=1, help="without the mask, draw from the model's this many likeliest tokens"))
    banned_tokens: tuple[str, ...] = field(default=(), metadata=_limits(
        help="token strings never proposed (special tokens never are)"))


@dataclass(frozen=True)
class FavoritesConfig:
    # the markdown file saved prompts are appended to; empty: favorites.md in the data folder
    path: str = ""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    sae: SAEConfig = SAEConfig()
    feature: FeatureConfig = FeatureConfig()
    search: SearchConfig = SearchConfig()
    favorites: FavoritesConfig = FavoritesConfig()
    # [keys]: the UI's key rebindings, {binding id ("main.start"): Textual key list ("g" or "g,f5")};
    # only their shape is checked here, the ids and conflicts by tui/keymap.py when the UI starts
    keys: dict[str, str] = field(default_factory=dict, compare=False)
    source: str = field(default=BUILTIN_SOURCE, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for result files, sessions and the worker: without the source, and without the
        UI's keys, which no search depends on."""
        data = dataclasses.asdict(self)
        data.pop("source")
        data.pop("keys")
        return data


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "sae": SAEConfig,
    "feature": FeatureConfig,
    "search": SearchConfig,
    "favorites": FavoritesConfig,
}


def field_help(section: str, name: str) -> str:
    """The one-line help of a config key (e.g. ("search", "candidates")), "" where it has none; KeyError
    for a key the section does not have."""
    for spec in dataclasses.fields(SECTIONS[section]):
        if spec.name == name:
            return spec.metadata.get("help", "")
    raise KeyError(f"[{section}] has no key {name!r}")


def load_config(spec: str | None = None) -> Config:
    """The config named by `--config` (a path or `sample:NAME`), else the user's file, else defaults."""
    if spec is None:
        user_file = paths.default_config_file()
        return load_config_file(user_file) if user_file.is_file() else Config()
    if spec.startswith("sample:"):
        name = spec.removeprefix("sample:")
        samples = paths.sample_configs()
        if name not in samples:
            raise UserError(
                f"--config: no sample config named '{name}'{did_you_mean(name, samples)}"
                f" (samples: {', '.join(samples)})"
            )
        return load_config_file(samples[name])
    path = paths.expand_user(spec)
    if path.is_dir():
        raise UserError(f"--config: '{spec}' is a folder, not a config file")
    if not path.is_file():
        raise UserError(f"--config: no such file '{spec}'")
    return load_config_file(path)


def load_config_file(path: Path) -> Config:
    source = str(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"{source}: cannot read: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(source, "", f"not valid UTF-8 (byte {err.start})") from None
    return parse_config(text, source=source, base_dir=path.parent)


def parse_config(text: str, source: str = "<string>", base_dir: Path | None = None) -> Config:
    """Validate TOML text into a Config; relative paths resolve against `base_dir`."""
    try:
        document = tomli.loads(text)
    except tomli.TOMLDecodeError as err:
        where = f"line {err.lineno}, column {err.colno}" if getattr(err, "lineno", None) else "?"
        reason = getattr(err, "msg", str(err))
        raise ConfigError(source, "", f"invalid TOML at {where}: {reason}") from None
    return config_from_data(document, source, base_dir)


def config_from_data(document: dict, source: str = "<data>", base_dir: Path | None = None) -> Config:
    """Validate plain data (parsed TOML, or `Config.to_dict()` sent by a client or kept in a session)
    into a Config. Keys whose value is None are left at their defaults (TOML has no null)."""
    if not isinstance(document, dict):
        raise ConfigError(source, "", f"expected a table of sections, found {_describe(document)}")
    document = {name: ({k: v for k, v in table.items() if v is not None} if isinstance(table, dict) else table)
                for name, table in document.items()}
    budget = document.get("search", {}).get("time_budget") if isinstance(document.get("search"), dict) else None
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):  # TOML `time_budget = 90`: seconds
        document["search"]["time_budget"] = str(budget)
    keys = _key_bindings(document.pop("keys", {}), source)
    for name in document:
        if name not in SECTIONS:
            raise ConfigError(
                source, name, f"unknown section{did_you_mean(name, [*SECTIONS, 'keys'])}"
                f" (allowed: {', '.join(SECTIONS)}, keys)"
            )
    built = {}
    for name, cls in SECTIONS.items():
        table = document.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(source, name, f"expected a table [{name}], found {_describe(table)}")
        built[name] = _build_section(cls, name, table, source)

    model = _resolve_choice(built["model"], table=document.get("model", {}), source=source,
                            section="model", remote=("name",), local="path", base_dir=base_dir)
    sae = _resolve_choice(built["sae"], table=document.get("sae", {}), source=source,
                          section="sae", remote=("release", "id"), local="path", base_dir=base_dir)
    if sae.labels:
        sae = dataclasses.replace(sae, labels=str(_relative_to(sae.labels, base_dir)))
    feature = built["feature"]
    if feature.kind in ("neuron", "vector") and not feature.hook:
        raise ConfigError(source, "feature.hook", f"missing; feature.kind '{feature.kind}' reads a hook "
                          "such as 'blocks.5.mlp.hook_post'")
    if feature.kind == "vector":
        if not feature.vector:
            raise ConfigError(source, "feature.vector", "missing; feature.kind 'vector' needs a .npy file")
        feature = dataclasses.replace(feature, vector=str(_relative_to(feature.vector, base_dir)))
    if feature.combine == "contrast" and len(feature.features) < 2:
        raise ConfigError(source, "feature.combine", "'contrast' needs feature.indices = [raise, hold down, ...]")
    search = built["search"]
    if search.penalty_min > search.penalty_max:
        raise ConfigError(
            source, "search.penalty_min",
            f"{search.penalty_min} is larger than search.penalty_max ({search.penalty_max})",
        )
    try:
        budget_seconds(search.time_budget)
    except ValueError as err:
        raise ConfigError(source, "search.time_budget", str(err)) from None
    if search.penalty_min <= 0:
        raise ConfigError(source, "search.penalty_min",
                          f"must be > 0 (penalties are log-spaced), found {search.penalty_min}")
    favorites = built["favorites"]
    if favorites.path:
        favorites = dataclasses.replace(favorites, path=str(_relative_to(favorites.path, base_dir)))
    return Config(model=model, sae=sae, feature=feature, search=search, favorites=favorites, keys=keys,
                  source=source)


def _key_bindings(table: Any, source: str) -> dict[str, str]:
    """[keys] flattened to {binding id: comma-separated keys}: `[keys.main] start = "g"` (or
    `"main.start" = "g"`) gives {"main.start": "g"}; a value is a key or an array of keys."""
    if not isinstance(table, dict):
        raise ConfigError(source, "keys", f"expected a table [keys], found {_describe(table)}")
    flat: dict[str, str] = {}
    for name, value in table.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for action, keys in items:
            binding_id = f"{name}.{action}" if action is not None else name
            where = f"keys.{binding_id}"
            if isinstance(keys, str):
                keys = [keys]
            if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k.strip() for k in keys):
                raise ConfigError(source, where, f"expected a key such as \"g\" or \"ctrl+g\", or an array of "
                                  f"them, found {_describe(keys)}")
            if any("," in k for k in keys):
                raise ConfigError(source, where, "give several keys as an array (\"a\", \"b\"), not one string "
                                  "with commas")
            flat[binding_id] = ",".join(k.strip() for k in keys)
    return flat


def _build_section(cls: type, section: str, table: dict, source: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in table.items():
        dotted = f"{section}.{key}"
        if key not in fields:
            raise ConfigError(
                source, dotted, f"unknown key{did_you_mean(key, fields)}"
                f" (allowed in [{section}]: {', '.join(fields)})"
            )
        values[key] = _check_value(value, hints[key], fields[key].metadata, source, dotted)
    return cls(**values)


def _check_value(value: Any, hint: Any, limits: typing.Mapping, source: str, key: str) -> Any:
    if typing.get_origin(hint) is tuple:  # tuple[X, ...]: a TOML array of X
        if not isinstance(value, (list, tuple)):
            raise ConfigError(source, key, f"expected an array, found {_describe(value)}")
        item = typing.get_args(hint)[0]
        return tuple(_check_value(v, item, limits, source, f"{key}[{i}]") for i, v in enumerate(value))
    allowed = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
    allowed.discard(type(None))
    if len(allowed) > 1:  # e.g. int | str: the value's own type where it is one of them
        return _check_union(value, allowed, source, key)
    expected = allowed.pop()
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(source, key, f"expected {_TYPE_NAMES[expected]}, found {_describe(value)}")
    if expected is float and not math.isfinite(value):
        raise ConfigError(source, key, f"expected a finite number, found {value}")
    if expected is int and not INT_MIN <= value <= INT_MAX:
        raise ConfigError(source, key, f"{value} does not fit in a 64-bit integer (TOML's limit)")
    choices = limits.get("choices")
    if choices and value not in choices:
        raise ConfigError(
            source, key, f"'{value}' is not one of {', '.join(choices)}{did_you_mean(value, choices)}"
        )
    if limits.get("min") is not None and value < limits["min"]:
        raise ConfigError(source, key, f"must be >= {limits['min']}, found {value}")
    if limits.get("max") is not None and value > limits["max"]:
        raise ConfigError(source, key, f"must be <= {limits['max']}, found {value}")
    return value


def _check_union(value: Any, allowed: set[type], source: str, key: str) -> Any:
    """A value of a key that takes a number or a word: only model.model_parallel ("auto" or >= 1)."""
    if isinstance(value, int) and not isinstance(value, bool) and int in allowed:
        if value < 1:
            raise ConfigError(source, key, f"must be >= 1 or \"auto\", found {value}")
        if value > INT_MAX:
            raise ConfigError(source, key, f"{value} does not fit in a 64-bit integer (TOML's limit)")
        return value
    if value == "auto" and str in allowed:
        return value
    raise ConfigError(source, key, f"expected an integer >= 1 or \"auto\", found {_describe(value)}")


def _resolve_choice(built, *, table: dict, source: str, section: str, remote: tuple[str, ...],
                    local: str, base_dir: Path | None):
    """A section names its source either remotely (hub / registry keys) or by a local path."""
    given_remote = [k for k in remote if k in table]
    if local in table:
        if given_remote:
            raise ConfigError(
                source, f"{section}.{given_remote[0]}",
                f"give either {section}.{local} or {' + '.join(f'{section}.{k}' for k in remote)}, not both",
            )
        path = _relative_to(table[local], base_dir)
        return dataclasses.replace(built, **{k: None for k in remote}, **{local: str(path)})
    if given_remote and len(given_remote) < len(remote):
        missing = next(k for k in remote if k not in table)
        raise ConfigError(source, f"{section}.{missing}",
                          f"missing; {section}.{given_remote[0]} needs {section}.{missing} too")
    return built


def _relative_to(text: str, base_dir: Path | None) -> Path:
    """A path from the config: `~` expanded, relative ones resolved against the config's folder."""
    path = paths.expand_user(text)
    return base_dir / path if not path.is_absolute() and base_dir is not None else path


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _describe(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)
    shown = repr(value) if not isinstance(value, (dict, list)) else ""
    return f"{shown} ({kind})".strip() if shown else kind
