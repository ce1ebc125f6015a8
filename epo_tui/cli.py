"""The `epo-tui` command line.

Heavy libraries (jax, torch, transformers, sae-lens) are imported inside the commands that need them,
so `--help`, config errors and the UI start instantly. Errors a user can fix are one line on stderr
and exit code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from epo_tui import __version__, paths
from epo_tui.budget import EXAMPLES, budget_seconds, format_budget
from epo_tui.config import COMBINES, INT_MAX, Config, field_help, load_config
from epo_tui.errors import UserError, first_line
from epo_tui.features import config_labels, with_labels
from epo_tui.progress import progress_reporter
from epo_tui.text import inert, json_line

EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer its pipe's reader left
EXIT_INTERRUPTED = 130  # Ctrl-C: the results so far are written, and scripts can still tell
RUNS_DIR = Path("epo-runs")
QUALITY_LATENTS = 20
QUALITY_PAIRS = 10
QUALITY_TIME_BUDGET = "30s"  # per latent, searched for a fixed wall clock: 20 demo latents in about 11 minutes


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump), exit code 2."""

    def error(self, message: str):  # noqa: D102 - argparse hook
        self.exit(EXIT_USAGE, f"{self.prog}: error: {inert(message)} (see {self.prog} --help)\n")


def _common_options(top_level: bool) -> argparse.ArgumentParser:
    """--config, --demo, --debug: accepted before and after the command. The command's copies default
    to SUPPRESS, or argparse would overwrite `epo-tui --demo score` back to the default."""
    def default(value):
        return value if top_level else argparse.SUPPRESS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=default(None),
                        help="config file, or sample:NAME for a shipped sample (default: the user's "
                             "config.toml, else built-in defaults)")
    common.add_argument("--demo", action="store_true", default=default(False),
                        help="use the bundled demo pack (a small GPT-2 and its SAE; offline) instead of a config")
    common.add_argument("--debug", action="store_true", default=default(False), help="show tracebacks")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options(top_level=False)
    parser = _Parser(prog="epo-tui", parents=[_common_options(top_level=True)],
                     description="Evolutionary prompt optimization for sparse-autoencoder features. "
                                 "`epo-tui --demo` alone opens the UI on the bundled demo pack.")
    parser.add_argument("--version", action="version", version=f"epo-tui {__version__}")
    parser.add_argument("--worker", metavar="COMMAND",
                        help="the UI's worker command, run exactly as typed (no shell), e.g. \"ssh host epo-tui "
                             "worker\" (default: a local worker)")
    parser.add_argument("--theme", metavar="NAME", help="the UI's theme (default epo-dark; see themes/)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_score_command(commands, common)
    _add_features_command(commands, common)
    _add_bench_command(commands, common)
    _add_run_command(commands, common)
    _add_batch_command(commands, common)
    _add_worker_command(commands, common)
    _add_sessions_command(commands, common)
    _add_registry_command(commands, common)
    _add_import_command(commands, common)
    _add_dataset_command(commands, common)
    return parser


def _add_score_command(commands, common: argparse.ArgumentParser) -> None:
    """`score TEXT`: one text's per-token activation and fluency."""
    score = commands.add_parser("score", parents=[common], help="per-token activation and fluency of a text")
    score.add_argument("--feature", type=int, metavar="N", help="SAE latent (default: feature.index)")
    score.add_argument("--json", action="store_true", help="print one JSON object")
    score.add_argument("text", help="the text to score (placed after BOS and search.prefix)")


def _add_features_command(commands, common: argparse.ArgumentParser) -> None:
    """`features`: the SAE's catalog, or the features a query matches."""
    features = commands.add_parser("features", parents=[common],
                                   help="list the SAE's features with their top tokens")
    features.add_argument("--search", metavar="QUERY",
                          help="only the features the query matches, best first, as in the UI's feature list: words "
                               "matched in the label and top tokens, or #N for latent N")
    features.add_argument("--limit", type=int, metavar="N", help="print at most N features")
    features.add_argument("--json", action="store_true", help="one JSON object per feature per line")


def _add_bench_command(commands, common: argparse.ArgumentParser) -> None:
    """`bench`: speed (the default), search quality (--quality) or UI latency (--ui)."""
    bench = commands.add_parser("bench", parents=[common],
                                help="time the EPO loop: seconds per step, tokens/s, FLOP/s, MFU, warm start")
    bench.add_argument("--model", choices=("gpt2-small", "tiny", "config"),
                       help="gpt2-small: GPT-2 small's shapes with random weights; tiny: the tiny helper model; "
                            "config: the model and SAE of --config or --demo (default: config with --demo, "
                            "else gpt2-small, then tiny and its warm start)")
    bench.add_argument("--iterations", type=int, metavar="N",
                       help="EPO iterations per setup, the first compiles (default: gpt2-small 3, tiny 20, "
                            f"config 5; --quality: none, each latent searches for {QUALITY_TIME_BUDGET}; given alone, "
                            "N iterations per latent replace that budget)")
    bench.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                       help="weights of the gpt2-small setup (default float32)")
    bench.add_argument("--no-warm-start", action="store_true",
                       help="skip timing fresh processes to their first iteration (tiny)")
    bench.add_argument("--json", action="store_true", help="print one JSON object with every figure")
    quality = bench.add_argument_group(
        "search quality (--quality): N random alive latents; each one's maximum activation over a held-out "
        "text against the best activation the search finds at an xent <= the text's median + 1 nat")
    quality.add_argument("--quality", action="store_true", help="measure search quality instead of speed")
    quality.add_argument("--latents", type=int, metavar="N",
                         help=f"latents to search (default {QUALITY_LATENTS})")
    quality.add_argument("--pairs", type=int, nargs="?", const=QUALITY_PAIRS, metavar="N",
                         help=f"instead of single latents, N random pairs (default {QUALITY_PAIRS}) that fire "
                              "together on the held-out text: can one prompt make both reach half their "
                              "maximum on one token?")
    quality.add_argument("--cofiring", type=float, metavar="SHARE",
                         help="with --pairs: draw pairs that both reach SHARE of their held-out maxima on one "
                              "token (default 0.25, bench/pairs.py's COFIRING_SHARE; 0: both above zero)")
    quality.add_argument("--heldout", metavar="PATH",
                         help="held-out text: .jsonl of {\"text\": ...} or a plain text file (default with "
                              "--demo: the pack's held-out sample)")
    quality.add_argument("--seed", type=int, default=0, metavar="S",
                         help="seed of the latent draw and of every search (default 0)")
    quality.add_argument("--time-budget", metavar="DURATION",
                         help=f"wall clock per latent ({EXAMPLES}; default {QUALITY_TIME_BUDGET} unless --iterations "
                              "is given); with --iterations, whichever comes first (the config's "
                              "search.time_budget is not used here)")
    from epo_tui.bench.ui_latency import add_options as add_ui_options  # --ui, --presses, --size

    add_ui_options(bench)


def _add_run_command(commands, common: argparse.ArgumentParser) -> None:
    """`run`: one search, or a resumed session."""
    run = commands.add_parser(
        "run", parents=[common], help="one search; writes result.json and report.md",
        description="Run one EPO search with a progress bar on stderr, then write DIR/result.json and "
                    "DIR/report.md. Ctrl-C stops after the current iteration and still writes them "
                    f"(exit code {EXIT_INTERRUPTED}); so does a time budget running out (exit code 0).")
    run.add_argument("--feature", type=int, action="append", metavar="N",
                     help="SAE latent (default: the config's); repeat for several, combined by --combine")
    run.add_argument("--combine", choices=COMBINES,
                     help="how several features make one objective (default: feature.combine)")
    _search_options(run, "./epo-runs/<time>-f<features>",
                    "stop after this much wall clock, set-up included")
    run.add_argument("--resume", metavar="ID",
                     help="continue a stopped session exactly where it stopped (its own config; see "
                          "`epo-tui sessions`); --iterations then sets the new total (a finished session "
                          "without it: another search's worth)")


def _add_batch_command(commands, common: argparse.ArgumentParser) -> None:
    """`batch`: one search per feature, on one process or split over several."""
    batch = commands.add_parser(
        "batch", parents=[common], help="one search per feature, with an index of the best prompts",
        description="One search per feature, each in DIR/feature-N/ (result.json, report.md), then "
                    "DIR/index.md and DIR/index.json sorted by best activation, or, where the SAE has dataset "
                    "statistics, by its ratio to each latent's dataset maximum. The model and SAE load once; "
                    "a time budget is split equally between the features. "
                    "Several processes (hosts) split the features between them: see README, 'Run a search'. "
                    f"Ctrl-C writes what finished and the index (exit code {EXIT_INTERRUPTED}).")
    which = batch.add_mutually_exclusive_group(required=True)
    which.add_argument("--features", type=_feature_list, metavar="N,N,...", help="the features, e.g. 3,17,42")
    which.add_argument("--random", type=int, metavar="N",
                       help="N distinct features drawn uniformly from 0..d_sae-1 by numpy's RNG seeded with "
                            "--seed (default search.seed): the same seed draws the same features")
    _search_options(batch, "./epo-runs/<time>-batch-<count>",
                    "the whole batch's wall clock: each feature gets BUDGET / number of features (with "
                    "several processes, / this process's features), set-up included")
    hosts = batch.add_argument_group("several processes (all three flags, the same on every process but "
                                     "--process-id; or set by the environment: see README)")
    hosts.add_argument("--coordinator", metavar="HOST:PORT", help="where process 0 listens")
    hosts.add_argument("--num-processes", type=int, metavar="P", help="how many processes in all")
    hosts.add_argument("--process-id", type=int, metavar="I", help="this process, 0..P-1")
    hosts.add_argument("--distributed", action="store_true",
                       help="let jax.distributed detect the cluster (Cloud TPU pod, Slurm, Open MPI, Kubernetes)")


def _add_worker_command(commands, common: argparse.ArgumentParser) -> None:
    """`worker`: the engine served over stdin/stdout."""
    commands.add_parser("worker", parents=[common], help="serve the engine over stdin/stdout (the UI's back end)",
                        description="Serve the engine over stdin/stdout: newline-delimited JSON commands in, "
                                    "events out (epo_tui/PROTOCOL.md). The UI starts it; `ssh host epo-tui "
                                    "worker` runs it on another machine.")


def _add_sessions_command(commands, common: argparse.ArgumentParser) -> None:
    """`sessions list|show|export|delete`."""
    sessions = commands.add_parser("sessions", parents=[common], help="list, show, export or delete saved sessions",
                                   description="Every search is a session in the cache folder, checkpointed at "
                                               "most 30 s apart and when it stops; `epo-tui run --resume ID` "
                                               "continues one.")
    actions = sessions.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    actions.add_parser("list", parents=[common], help="every session, newest first (the default)")
    show = actions.add_parser("show", parents=[common], help="one session's status and elites")
    show.add_argument("id", metavar="ID", help="a session id or a unique prefix of one")
    export = actions.add_parser("export", parents=[common], help="one session as markdown on stdout, or one elite to favorites")
    export.add_argument("id", metavar="ID", help="a session id or a unique prefix of one")
    export.add_argument("--favorite", type=int, metavar="K",
                        help="append elite K (0 = the lowest fluency penalty) to the favorites file instead")
    delete = actions.add_parser("delete", parents=[common], help="remove a session folder")
    delete.add_argument("id", metavar="ID", help="a session id (the full id)")
    delete.add_argument("--force", action="store_true",
                        help="delete even a session marked running (its worker was killed)")


def _add_registry_command(commands, common: argparse.ArgumentParser) -> None:
    """`registry`: what of the installed sae-lens registry epo-tui loads."""
    registry = commands.add_parser(
        "registry", parents=[common], help="which SAEs of the installed sae-lens registry epo-tui loads",
        description="List the installed sae-lens registry's releases by model: model type, epo-tui family, "
                    "weight memory in bfloat16, SAE kinds, how many entries epo-tui loads and why not the "
                    "others; then the share loaded. Offline: nothing is downloaded.")
    registry.add_argument("--json", action="store_true", help="print one JSON document")
    registry.add_argument("--release", metavar="SUBSTRING",
                          help="only releases whose name contains SUBSTRING (any case)")


def _add_import_command(commands, common: argparse.ArgumentParser) -> None:
    """`import PATH...`: Neuronpedia's exports of the config's SAE, kept in the data folder."""
    from epo_tui.neuronpedia import DEFAULT_TOP_K

    imports = commands.add_parser(
        "import", parents=[common], help="import Neuronpedia's exports of the SAE: labels and dataset statistics",
        description="Import Neuronpedia's bulk exports of the config's SAE (v1/<model>/<source>/: explanations/, "
                    "activations/, features/ batches, .jsonl or .jsonl.gz, and source.jsonl): explanations become "
                    "labels, activations and features the SAE's dataset statistics (maximum, density, histogram, "
                    "top examples per latent). Both are kept in the data folder for the UI and later commands; a "
                    "later import adds to an earlier one. Exports for another SAE are refused.")
    imports.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, metavar="K",
                         help=f"examples kept per latent, the strongest (default {DEFAULT_TOP_K})")
    imports.add_argument("paths", nargs="+", metavar="PATH",
                         help="export files, or folders searched for them (a whole v1/<model>/<source>/ folder)")


def _add_dataset_command(commands, common: argparse.ArgumentParser) -> None:
    """`dataset (--text FILE... | --jsonl FILE...)`: a local pass over text, the SAE's dataset statistics."""
    dataset = commands.add_parser(
        "dataset", parents=[common], help="the SAE's dataset statistics from a pass over your own text",
        description="Run text through the model and SAE in batches and keep, per latent: its maximum activation "
                    "and context, its top examples (rows) with every token's activation, its firing density and "
                    "a histogram of its activations. The statistics go to the SAE's local store in the data "
                    "folder, for the UI and later commands. Ctrl-C (or SIGTERM) stops after the batch; rerunning "
                    "the same command continues from the last checkpoint, and a finished one is not run again.")
    text = dataset.add_mutually_exclusive_group()
    text.add_argument("--text", nargs="+", metavar="FILE", default=[], help="plain text files, one document each")
    text.add_argument("--jsonl", nargs="+", metavar="FILE", default=[],
                      help="JSON-lines files, one document per line in its \"text\" field")
    dataset.add_argument("--tokens", type=int, metavar="N", help="read at most N tokens of text (default: all)")
    dataset.add_argument("--context", type=int, default=128, metavar="C",
                         help="tokens a row: BOS and C-1 tokens of text (default 128)")
    dataset.add_argument("--top-k", type=int, default=20, metavar="K", help="examples kept per latent (default 20)")
    dataset.add_argument("--batch-size", type=int, default=16, metavar="B",
                         help="rows run through the model at once (default 16)")
    dataset.add_argument("--checkpoint-every", type=int, metavar="BATCHES",
                         help="a checkpoint every this many batches (default: every 30 s)")


def _search_options(parser: argparse.ArgumentParser, default_out: str, budget_help: str) -> None:
    parser.add_argument("--iterations", type=int, metavar="I",
                        help=f"{field_help('search', 'iterations')} (default: search.iterations)")
    parser.add_argument("--time-budget", metavar="DURATION",
                        help=f"{budget_help}: {EXAMPLES}, or none; the iterations still cap it, whichever comes "
                             "first (default: search.time_budget)")
    parser.add_argument("--seed", type=int, metavar="S", help=f"{field_help('search', 'seed')} (default: search.seed)")
    parser.add_argument("--out", metavar="DIR", help=f"output folder (default: {default_out})")


def _feature_list(text: str) -> list[int]:
    """argparse type for --features: comma-separated, distinct, non-negative integers."""
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected feature indices like 1,2,3, found '{text}'") from None
    negative = [v for v in values if v < 0]
    repeated = sorted({v for v in values if values.count(v) > 1})
    if negative:
        raise argparse.ArgumentTypeError(f"feature indices must be >= 0, found {negative[0]}")
    if repeated:
        raise argparse.ArgumentTypeError(f"feature {repeated[0]} is listed twice")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.demo and args.config:
            raise UserError("--demo and --config: give one of them")
        config = load_config(str(paths.demo_config_file()) if args.demo else args.config)
        if args.command is None:
            return cmd_ui(args, config)
        if args.worker or args.theme:
            raise UserError("--worker and --theme: options of the UI (epo-tui without a command)")
        code = COMMANDS[args.command](args, config)
        sys.stdout.flush()  # here, where a reader that left (BrokenPipeError) is caught, not at exit
        return code
    except UserError as err:
        if args.debug:
            traceback.print_exc()
        print(f"epo-tui: error: {inert(str(err))}", file=sys.stderr)  # one line, whatever the input held
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("epo-tui: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`epo-tui sessions | head`): stop quietly, as `yes | head` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush cannot fail again
        return EXIT_BROKEN_PIPE
    except Exception as err:  # a bug of ours: one line unless --debug
        if args.debug:
            traceback.print_exc()
        else:
            print(f"epo-tui: internal error: {inert(first_line(err))} (rerun with --debug for the "
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
    from epo_tui.protocol import Scored
    from epo_tui.terminal import print_score

    feature, feature_source = _feature_index(args, config)
    pair = load_model_with_sae(config, feature, feature_source)
    scored = score_text(pair, args.text, feature, prefix=config.search.prefix)
    if args.json:
        print(json_line(scored))
    else:
        print_score(Scored(feature=feature, **scored))
    return 0


def _config_labels(config: Config, sae) -> dict[int, str] | None:
    """The config's sae.labels for the loaded SAE (an export for another SAE is a UserError); what the
    reader skipped or could not check goes to stderr, one line each."""
    imported = config_labels(config.sae.labels, sae)
    if imported is None:
        return None
    for note in imported.notes:
        print(f"epo-tui: sae.labels {inert(config.sae.labels)}: {inert(note)}", file=sys.stderr)
    return imported.labels


def cmd_features(args: argparse.Namespace, config: Config) -> int:
    from epo_tui.engine.feature_catalog import feature_catalog
    from epo_tui.engine.pairing import load_model_with_sae
    from epo_tui.feature_search import search_features
    from epo_tui.terminal import print_features

    if args.limit is not None and args.limit < 0:
        raise UserError(f"--limit: must be >= 0, found {args.limit}")
    pair = load_model_with_sae(config)
    labels = _config_labels(config, pair.sae)  # before the catalog: a refused export fails fast
    entries = with_labels(feature_catalog(pair), labels)
    if args.search is not None:
        entries = search_features(entries, args.search)
    entries = entries[: args.limit] if args.limit is not None else entries
    if args.json:
        for entry in entries:
            sys.stdout.write(json_line(entry.to_json()) + "\n")
    else:
        print_features(entries)
    return 0


# ----------------------------------------------------------------------------------------------
# run and batch


def _require_at_least_one(option: str, value: int | None) -> None:
    """Raises UserError for a count option given below 1 (None: not given)."""
    if value is not None and value < 1:
        raise UserError(f"{option}: must be >= 1, found {value}")


def _search_overrides(args: argparse.Namespace, config: Config) -> Config:
    """--iterations and --seed over the config's [search]."""
    search = config.search
    if args.iterations is not None:
        _require_at_least_one("--iterations", args.iterations)
        search = dataclasses.replace(search, iterations=args.iterations)
    if args.seed is not None:
        if not 0 <= args.seed <= INT_MAX:
            raise UserError(f"--seed: must be 0..{INT_MAX}, found {args.seed}")
        search = dataclasses.replace(search, seed=args.seed)
    if args.time_budget is not None:
        search = dataclasses.replace(search, time_budget=_time_budget(args.time_budget))
    return dataclasses.replace(config, search=search)


def _time_budget(text: str) -> str:
    """--time-budget as search.time_budget writes it ("" for none); a bad value is a UserError."""
    try:
        seconds = budget_seconds(text)
    except ValueError as err:
        raise UserError(f"--time-budget: {err}") from None
    return "" if seconds is None else format_budget(seconds)


def _feature_overrides(args: argparse.Namespace, config: Config) -> Config:
    """--feature (repeatable) and --combine over the config's [feature]."""
    feature = config.feature
    if args.feature:
        for index in args.feature:
            if index < 0:
                raise UserError(f"--feature: must be >= 0, found {index}")
            if args.feature.count(index) > 1:
                raise UserError(f"--feature: {index} is given twice")
        several = tuple(args.feature) if len(args.feature) > 1 else ()
        feature = dataclasses.replace(feature, index=args.feature[0], indices=several)
    if args.combine is not None:
        if args.combine == "contrast" and len(feature.features) < 2:
            raise UserError("--combine contrast: needs two or more features (--feature A --feature B: "
                            "raise A, hold B down)")
        feature = dataclasses.replace(feature, combine=args.combine)
    return dataclasses.replace(config, feature=feature)


def _out_folder(option: str | None, default_name: str, *, rerun_allowed: bool = False) -> Path:
    """The results folder: --out, else ./epo-runs/<time>-<default_name>, checked before anything loads (a
    file, or a folder under one that cannot be written, is one line now, not an error after the search).
    A folder holding a result.json or report.md is refused unless `rerun_allowed` (a batch continues its
    own folder): a run never overwrites them. The runner makes the folder once the search is set up."""
    out = Path(option).expanduser() if option else _default_out(default_name)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {inert(str(out))}: is a file, not a folder")
    from epo_tui.results import RESULT_FILES

    held = [name for name in RESULT_FILES if (out / name).exists()]
    if held and not rerun_allowed:
        raise UserError(f"--out {inert(str(out))}: holds {' and '.join(held)} already, which a run would "
                        "overwrite; give another folder")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"--out {inert(str(out))}: {inert(str(existing))} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {inert(str(out))}: {inert(str(existing))} is not writable")
    return out


def _default_out(name: str) -> Path:
    """./epo-runs/<time>-<name>, with -2, -3... if that folder exists already."""
    base = RUNS_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def _load_pair(config: Config, features: Sequence[int], source: str):
    """Model and SAE, with every SAE feature index checked before the model loads."""
    from epo_tui.engine.pairing import load_model_with_sae

    checks_sae = config.feature.kind in ("sae", "direction")
    return load_model_with_sae(config, max(features) if checks_sae else None, source)


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    if args.resume is not None:
        return _resume_run(args)
    config = _feature_overrides(args, _search_overrides(args, config))
    features = config.feature.features
    out = _out_folder(args.out, "f" + "+".join(map(str, features)))
    from epo_tui.engine.compile_cache import enable_compile_cache

    enable_compile_cache()  # a second run of the same shapes skips XLA compilation
    pair = _load_pair(config, features, "--feature" if args.feature else config.source)
    from epo_tui.engine.runner import StopFlag, run_one

    with StopFlag() as stop, progress_reporter() as reporter:
        result = run_one(pair, config, out, reporter, stop)
    return _print_run_line(result, out)


def _print_run_line(result: dict, out: Path) -> int:
    """The last line of `run`: how it ended, the highest act found (the frontier's end, with its xent:
    an elite trades act for xent at its λ), and where the results are."""
    timings, best = result["timings"], max(result["frontier"] or result["elites"], key=lambda p: p["act"])
    ran = f"{timings['iterations_run']}/{timings['iterations_requested']} iterations"
    start = len(result["best_objective_history"]) - timings["iterations_run"]  # > 0: a resumed session
    if start > 0:
        ran += (f" (the session at iteration {start + timings['iterations_run']} of "
                f"{start + timings['iterations_requested']})")
    if timings["interrupted"]:
        head = f"interrupted after {ran}"
    elif timings["budget_ran_out"]:
        head = f"time budget {format_budget(timings['time_budget_s'])} ran out after {ran}"
    else:
        head = f"ran {ran}"
    print(f"{head} in {timings['total_s']:.1f} s; best act {best['act']:.3f} (xent {best['xent']:.3f}); "
          f"results in {inert(str(out))}/ (result.json, report.md); session {result['session']}")
    return EXIT_INTERRUPTED if timings["interrupted"] else 0


def _resume_run(args: argparse.Namespace) -> int:
    from epo_tui import sessions

    given = [flag for flag, value in (("--config", args.config), ("--demo", args.demo), ("--feature", args.feature),
                                      ("--combine", args.combine), ("--seed", args.seed)) if value]
    if given:
        raise UserError(f"--resume: the session keeps its own config; drop {', '.join(given)}")
    _require_at_least_one("--iterations", args.iterations)
    if not args.resume.strip():
        raise UserError("--resume: give a session's id, or the start of it or of its 6-letter tail "
                        "(`epo-tui sessions` lists them)")
    budget = _time_budget(args.time_budget) if args.time_budget is not None else None
    session = sessions.find_session(args.resume)
    from epo_tui.engine.compile_cache import enable_compile_cache
    from epo_tui.engine.runner import StopFlag, resume_one
    from epo_tui.engine.session_search import session_config

    enable_compile_cache()
    config = session_config(session)
    out = _out_folder(args.out, f"resume-{session.id}")
    pair = _load_pair(config, config.feature.features, f"session {session.id}")
    with StopFlag() as stop, progress_reporter() as reporter:
        result = resume_one(pair, session, out, reporter, stop, iterations_total=args.iterations, time_budget=budget)
    return _print_run_line(result, out)


def cmd_batch(args: argparse.Namespace, config: Config) -> int:
    from epo_tui.engine import distributed

    config = _search_overrides(args, config)
    if config.feature.kind == "vector":
        raise UserError(f"{config.source}: feature.kind 'vector' has no feature indices to run a batch over")
    _require_at_least_one("--random", args.random)
    spec = distributed.launch_spec(args.coordinator, args.num_processes, args.process_id, args.distributed)
    if spec is not None and args.out is None:
        raise UserError("--out: required with several processes (they all write into one folder)")
    cluster = distributed.connect(spec)  # before anything else touches jax
    from epo_tui.engine.compile_cache import enable_compile_cache
    from epo_tui.engine.runner import StopFlag, budget_share, random_features, run_batch

    enable_compile_cache()

    started = time.perf_counter()
    out = _out_folder(args.out, f"batch-{len(args.features) if args.features else args.random}", rerun_allowed=True)
    pair = _load_pair(config, args.features or [0], "--features")
    if args.random is not None and args.random > pair.sae.d_sae:
        raise UserError(f"--random: {args.random} features asked, the SAE has {pair.sae.d_sae}")
    seed = config.search.seed
    features = args.features or random_features(args.random, pair.sae.d_sae, seed)
    with StopFlag() as stop, progress_reporter() as reporter:
        index = run_batch(pair, config, features, out, reporter, stop, cluster)
    each = budget_share(config, len(cluster.share(features))).search.time_budget
    _print_batch_line(index, cluster, out, time.perf_counter() - started, each)
    return EXIT_INTERRUPTED if index["interrupted"] else 0


def _print_batch_line(index: dict, cluster, out: Path, seconds: float, budget_each: str = "") -> None:
    where = inert(str(out))
    if not cluster.is_leader:
        mine = [e["feature"] for e in index["features"] if e["process_id"] == cluster.process_id]
        print(f"process {cluster.process_id}/{cluster.num_processes}: ran features "
              f"{', '.join(map(str, sorted(mine))) or 'none'} in {where}/; process 0 writes the index")
        return
    done, asked = len(index["features"]), len(index["features_requested"])
    head = f"interrupted: {done}/{asked} features" if index["interrupted"] else f"ran {done}/{asked} features"
    best = index["features"][0] if index["features"] else None
    top = f"; best feature {best['feature']} (act {best['act']:.3f})" if best else ""
    share = f"; time budget {budget_each} per feature" if budget_each else ""
    print(f"{head} in {seconds:.1f} s{top}{share}; index in {where}/index.md")


def _progress_line(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_bench(args: argparse.Namespace, config: Config) -> int:
    if args.pairs is not None and not args.quality:
        raise UserError("--pairs: a kind of --quality benchmark (bench --quality --pairs)")
    if args.cofiring is not None and args.pairs is None:
        raise UserError("--cofiring: only with --pairs, whose draw it sets (bench --quality --pairs N --cofiring SHARE)")
    if args.latents is not None and (args.pairs is not None or not args.quality):
        raise UserError("--latents: the single-latent --quality benchmark's count; --pairs N counts pairs")
    if args.time_budget is not None and not args.quality:
        raise UserError("--time-budget: a budget per latent of --quality (the speed benchmarks run fixed iterations)")
    for option, value in (("--presses", args.presses), ("--size", args.size)):
        if value is not None and not args.ui:
            raise UserError(f"{option}: an option of --ui (bench --ui {option} ...)")
    if args.ui:  # the UI's key-press-to-repaint latency while a search runs
        from epo_tui.bench.ui_latency import cmd_bench_ui

        return cmd_bench_ui(args, config, progress=_progress_line)
    _require_at_least_one("--iterations", args.iterations)
    if args.quality:
        return _bench_quality(args, config)
    from epo_tui.bench.speed import print_report, run_bench

    model = args.model or ("config" if args.demo else None)
    report = run_bench(model=model, config=config if model == "config" else None,
                       iterations=args.iterations, dtype=args.dtype, warm=not args.no_warm_start,
                       progress=_progress_line)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0


def _bench_quality(args: argparse.Namespace, config: Config) -> int:
    if args.model not in (None, "config"):
        raise UserError(f"--quality: measures the model and SAE of --config or --demo, not --model {args.model}")
    _require_at_least_one("--latents", args.latents)
    latents = QUALITY_LATENTS if args.latents is None else args.latents
    if args.pairs is not None:
        _require_at_least_one("--pairs", args.pairs)
    if args.cofiring is not None and not 0 <= args.cofiring < 1:
        raise UserError(f"--cofiring: a share of each latent's held-out maximum, 0 <= SHARE < 1; "
                        f"found {args.cofiring:g}")
    if not 0 <= args.seed <= INT_MAX:
        raise UserError(f"--seed: must be 0..{INT_MAX}, found {args.seed}")
    if args.heldout:
        heldout = Path(args.heldout).expanduser()
    elif args.demo:
        heldout = paths.demo_pack() / "heldout.jsonl"
    else:
        raise UserError("--quality: needs a held-out text: --heldout PATH, or --demo for the pack's sample")
    if args.time_budget is not None:
        budget = budget_seconds(_time_budget(args.time_budget))
    else:  # --iterations alone: a fixed count, no budget
        budget = None if args.iterations is not None else budget_seconds(QUALITY_TIME_BUDGET)
    config = dataclasses.replace(config, search=dataclasses.replace(config.search, seed=args.seed))
    from epo_tui.bench import quality

    texts = quality.read_heldout(heldout)
    if not any(text.strip() for text in texts):
        raise UserError(f"--heldout: {inert(str(heldout))} holds no text")
    pair = _load_pair(config, [0], config.source)
    labels = _config_labels(config, pair.sae)
    from epo_tui.engine.runner import StopFlag

    with StopFlag() as stop:
        common = dict(iterations=args.iterations, time_budget_s=budget, seed=args.seed, labels=labels,
                      progress=_progress_line, stop=stop)
        if args.pairs is not None:
            from epo_tui.bench import pairs

            share = pairs.COFIRING_SHARE if args.cofiring is None else args.cofiring
            report = pairs.run_pairs(pair, config, texts, pairs=args.pairs, cofiring_share=share, **common)
        else:
            report = quality.run_quality(pair, config, texts, latents=latents, **common)
    if args.json:
        print(quality.report_json(report))
    elif args.pairs is not None:
        pairs.print_pairs(report)
    else:
        quality.print_quality(report)
    return EXIT_INTERRUPTED if report["interrupted"] else 0


def cmd_registry(args: argparse.Namespace, config: Config) -> int:
    from epo_tui.engine import registry
    from epo_tui.errors import did_you_mean
    from epo_tui.terminal import print_registry

    directory = registry.read_directory()
    if args.release is not None and not any(args.release.lower() in name.lower() for name in directory):
        raise UserError(f"--release: no release name contains '{args.release}'"
                        f"{did_you_mean(args.release, directory)} ({len(directory)} releases)")
    report = registry.coverage(directory, release_filter=args.release)
    if args.json:
        print(json.dumps(report))
    else:
        print_registry(report)
    return 0


def cmd_import(args: argparse.Namespace, config: Config) -> int:
    from epo_tui import dataset_stats, neuronpedia
    from epo_tui.engine.sae_loading import load_sae
    from epo_tui.export_lines import ExportTarget, count

    if args.top_k < 1:
        raise UserError(f"--top-k: must be >= 1, found {args.top_k}")
    export_paths = [paths.expand_user(p) for p in args.paths]
    neuronpedia.find_export_files(export_paths)  # a path without an export fails before the SAE loads
    sae = load_sae(config.sae, source=config.source)  # the SAE alone says which exports fit: no model load
    model_name = config.model.path or config.model.name  # as the loaded model (and the UI's worker) names it
    key = dataset_stats.sae_key(model_name, sae.display_name)
    target = ExportTarget(neuronpedia_id=sae.neuronpedia_id, d_sae=sae.d_sae, release=sae.release, sae_id=sae.id)
    shown = inert(sae.neuronpedia_id or sae.display_name)
    outcome = neuronpedia.import_exports(export_paths, key, target, top_k=args.top_k,
                                         progress=lambda line: _progress_line(f"epo-tui: import: {inert(line)}"))
    for note in outcome.source_notes:
        print(f"epo-tui: import: {inert(note)}", file=sys.stderr)
    explained, stats = outcome.labels, outcome.stats
    if explained is not None:
        print(f"imported {count(len(explained.labels), 'label')} for {shown}{_import_notes(explained.notes)}")
    if stats is not None:
        print(f"imported statistics of {count(stats.latents, 'latent')}, {count(stats.examples, 'example')} for "
              f"{shown}{_import_notes(stats.notes)}")
    return 0


def _import_notes(notes: Sequence[str]) -> str:
    return f" ({'; '.join(inert(note) for note in notes)})" if notes else ""


def cmd_dataset(args: argparse.Namespace, config: Config) -> int:
    from epo_tui.dataset_text import JSONL, TEXT, TextSource
    from epo_tui.engine.dataset_job import DatasetOptions, run_dataset, summary_line
    from epo_tui.engine.runner import StopFlag
    from epo_tui.progress import dataset_progress

    sources = tuple(TextSource(paths.expand_user(p), TEXT) for p in args.text) + tuple(
        TextSource(paths.expand_user(p), JSONL) for p in args.jsonl)
    options = DatasetOptions(sources=sources, context=args.context, top_k=args.top_k, max_tokens=args.tokens,
                             batch_rows=args.batch_size, checkpoint_batches=args.checkpoint_every)
    with StopFlag() as stop, dataset_progress() as display:
        outcome = run_dataset(config, options, display, stop)
    print(inert(summary_line(outcome)), flush=True)
    return EXIT_INTERRUPTED if outcome.interrupted else 0


def cmd_ui(args: argparse.Namespace, config: Config) -> int:
    """The Textual app; its worker loads the same config (or its own demo pack, with --demo)."""
    from epo_tui.client import worker_command
    from epo_tui.themes import load_theme
    from epo_tui.tui.app import EpoApp, LoadSpec

    command = worker_command(args.worker) if args.worker else None
    theme = load_theme(args.theme) if args.theme else load_theme()
    EpoApp(config, LoadSpec.of(config, args.demo), command, theme).run()
    return 0


def cmd_worker(args: argparse.Namespace, config: Config) -> int:
    from epo_tui.engine.worker import serve

    code = serve()
    # The command reader thread may sit in a blocking read of stdin; a normal interpreter exit would
    # then abort (stdin's buffer lock is held). Everything is written and flushed by now: leave.
    sys.stderr.flush()
    os._exit(code)


def cmd_sessions(args: argparse.Namespace, config: Config) -> int:
    from epo_tui import favorites, session_report, sessions

    action = args.action or "list"
    if action == "list":
        found, problems = sessions.list_sessions()
        for problem in problems:
            print(f"epo-tui: skipped a damaged session: {inert(problem)}", file=sys.stderr)
        if not found:
            print("no sessions yet (every `epo-tui run` and every search in the UI makes one)")
        for entry in found:
            print(_session_line(entry))
        return 0
    if action == "delete":
        sessions.delete_session(args.id, force=args.force)
        print(f"deleted session {inert(args.id)}")
        return 0
    session = sessions.find_session(args.id)
    if action == "show":
        print(session_report.export_markdown(session), end="")
        return 0
    if args.favorite is None:  # export
        sys.stdout.write(session_report.export_markdown(session))
        return 0
    elites = session.read_elites()
    if not 0 <= args.favorite < len(elites):
        raise UserError(f"--favorite: session {session.id} has elites 0..{len(elites) - 1}, found {args.favorite}")
    path = favorites.append_favorite(favorites.favorites_path(config),
                                     favorites.favorite_from_elite(session.read_meta(), elites[args.favorite]))
    print(f"saved elite {args.favorite} of session {session.id} to {inert(str(path))}")
    return 0


def _session_line(entry) -> str:
    """id, status, iterations, features and label, model: one line per session."""
    status = entry.shown_status
    done = f"{entry.checkpoint_iteration if entry.checkpoint_iteration is not None else entry.iteration}"
    features = "+".join(map(str, entry.features)) or "?"
    label = f" {entry.label}" if entry.label else ""
    return inert(f"{entry.id}  {status:<11}  {done:>5}/{entry.iterations_total:<5}  feature {features}{label}"
                 f"  ({entry.model})")


COMMANDS = {"score": cmd_score, "features": cmd_features, "run": cmd_run, "batch": cmd_batch, "bench": cmd_bench,
            "worker": cmd_worker, "sessions": cmd_sessions, "registry": cmd_registry, "import": cmd_import,
            "dataset": cmd_dataset}
