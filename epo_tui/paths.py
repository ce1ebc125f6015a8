"""Where epo-tui keeps things on disk (platformdirs), and where the shipped files are."""

from __future__ import annotations

from pathlib import Path

import platformdirs

from epo_tui.errors import UserError

APP_NAME = "epo-tui"


def expand_user(path: str | Path) -> Path:
    """`~` and `~user` expanded as a shell does: a user that does not exist leaves the path as written
    (Path.expanduser raises RuntimeError there)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


def config_dir() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME))


def cache_dir() -> Path:
    """Sessions, converted SAEs, feature catalogs, JAX's compilation cache."""
    return Path(platformdirs.user_cache_dir(APP_NAME))


def data_dir() -> Path:
    """Things the user saved: favorites, stars, notes."""
    return Path(platformdirs.user_data_dir(APP_NAME))


def default_config_file() -> Path:
    return config_dir() / "config.toml"


def shipped_dir(name: str) -> Path:
    """A folder shipped with the project (`themes`, `sample_configs`).

    A wheel carries it inside the package; a source checkout (editable install) has it at the top
    of the repository.
    """
    package = Path(__file__).resolve().parent
    for candidate in (package / name, package.parent / name):
        if candidate.is_dir():
            return candidate
    raise UserError(f"the shipped folder '{name}' is missing from this installation ({package})")


def sample_configs() -> dict[str, Path]:
    """Shipped sample configs by name (file name without .toml)."""
    return {p.stem: p for p in sorted(shipped_dir("sample_configs").glob("*.toml"))}


def demo_pack() -> Path:
    """The bundled demo pack (model, SAE, labels, held-out sample, config.toml), inside the package."""
    return Path(__file__).resolve().parent / "demo" / "pack"


def demo_config_file() -> Path:
    config = demo_pack() / "config.toml"
    if not config.is_file():
        raise UserError(f"the demo pack is missing from this installation ({config.parent}); build it with "
                        "`python -m epo_tui.demo.build --stage all` (see epo_tui/demo/README.md)")
    return config
