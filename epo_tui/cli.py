"""The `epo-tui` command line.

Heavy libraries (jax, torch, transformers, sae-lens) are imported inside the commands that need them,
so `--help`, config errors and the UI start instantly. Errors a user can fix are one line on stderr
and exit code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence

from epo_tui import __version__
from epo_tui.config import Config, load_config
from epo_tui.errors import UserError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump), exit code 2."""

    def error(self, message: str):  # noqa: D102 - argparse hook
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH",
                        help="config file, or sample:NAME for a shipped sample (default: the user's "
                             "config.toml, else built-in defaults)")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = _Parser(prog="epo-tui", parents=[common],
                     description="Evolutionary prompt optimization for sparse-autoencoder features.")
    parser.add_argument("--version", action="version", version=f"epo-tui {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    score = commands.add_parser("score", parents=[common], help="per-token activation and fluency of a text")
    score.add_argument("--feature", type=int, metavar="N", help="SAE latent (default: feature.index)")
    score.add_argument("--json", action="store_true", help="print one JSON object")
    score.add_argument("text", help="the text to score (placed after BOS and search.prefix)")

    features = commands.add_parser("features", parents=[common],
                                   help="list the SAE's features with their top tokens")
    features.add_argument("--search", metavar="WORD", help="only features whose tokens or label match")
    features.add_argument("--limit", type=int, metavar="N", help="print at most N features")
    features.add_argument("--json", action="store_true", help="one JSON object per feature per line")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command is None:
            parser.print_help()
            return 0
        config = load_config(args.config)
        return COMMANDS[args.command](args, config)
    except UserError as err:
        if args.debug:
            traceback.print_exc()
        print(f"epo-tui: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("epo-tui: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug of ours: one line unless --debug
        if args.debug:
            traceback.print_exc()
        else:
            print(f"epo-tui: internal error: {type(err).__name__}: {err} (rerun with --debug for the "
                  "traceback)", file=sys.stderr)
        return 1


def _feature_index(args: argparse.Namespace, config: Config) -> tuple[int, str]:
    """The feature to use and where it came from, for error messages."""
    if args.feature is None:
        return config.feature.index, config.source
    if args.feature < 0:
        raise UserError(f"--feature: must be >= 0, found {args.feature}")
    return args.feature, "--feature"


def cmd_score(args: argparse.Namespace, config: Config) -> int:
    from epo_tui.engine.pairing import load_model_with_sae
    from epo_tui.engine.scoring import score_text
    from epo_tui.terminal import print_score

    feature, feature_source = _feature_index(args, config)
    pair = load_model_with_sae(config, feature, feature_source)
    scored = score_text(pair, args.text, feature, prefix=config.search.prefix)
    if args.json:
        print(json.dumps(scored, ensure_ascii=False))
    else:
        print_score(scored, feature)
    return 0


def cmd_features(args: argparse.Namespace, config: Config) -> int:
    from epo_tui.engine.logit_lens import feature_catalog
    from epo_tui.engine.pairing import load_model_with_sae
    from epo_tui.features import search_features
    from epo_tui.terminal import print_features

    if args.limit is not None and args.limit < 0:
        raise UserError(f"--limit: must be >= 0, found {args.limit}")
    entries = feature_catalog(load_model_with_sae(config))
    if args.search is not None:
        entries = search_features(entries, args.search)
    entries = entries[: args.limit] if args.limit is not None else entries
    if args.json:
        for entry in entries:
            sys.stdout.write(json.dumps(entry.to_json(), ensure_ascii=False) + "\n")
    else:
        print_features(entries)
    return 0


COMMANDS = {"score": cmd_score, "features": cmd_features}
