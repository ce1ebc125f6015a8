"""What a search leaves on disk: `result.json` (plain data) and `report.md` (readable on GitHub); for a
batch, `index.json` and `index.md` over the features' folders.

Plain Python (no jax), so the UI and other tools can read and write these files. Every piece of text
that came from a tokenizer, a path or a model name goes through `md_text` before it enters markdown:
`inert` first, then escapes, so a token can never add markup, links or HTML to a report.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from epo_tui.atomic import write_json_atomic, write_text_atomic
from epo_tui.budget import format_budget
from epo_tui.protocol import Elite, OptimizedFeature
from epo_tui.text import inert

RESULT_VERSION = 1
INDEX_VERSION = 1
RESULT_FILES = ("result.json", "report.md")  # what a search writes in its folder (write_result)


@dataclass
class RunTimings:
    """Wall-clock seconds of one search: set-up (Search + starting elites), then each iteration."""

    iterations_requested: int
    setup_s: float = 0.0
    iteration_s: list[float] = field(default_factory=list)
    interrupted: bool = False  # Ctrl-C (or a stop) before the last iteration
    time_budget_s: float | None = None  # search.time_budget, when one was set
    budget_ran_out: bool = False  # stopped by the time budget before the last iteration (not interrupted)

    @property
    def iterations_run(self) -> int:
        return len(self.iteration_s)

    def to_json(self) -> dict[str, Any]:
        rest = self.iteration_s[1:]
        return {
            "total_s": self.setup_s + sum(self.iteration_s),
            "setup_s": self.setup_s,
            "first_iteration_s": self.iteration_s[0] if self.iteration_s else None,  # with compilation
            "per_iteration_s": sum(rest) / len(rest) if rest else None,
            "iterations_run": self.iterations_run,
            "iterations_requested": self.iterations_requested,
            "interrupted": self.interrupted,
            "time_budget_s": self.time_budget_s,
            "budget_ran_out": self.budget_ran_out,
        }


def build_result(*, config: dict, feature: OptimizedFeature, model: str, sae: dict, timings: RunTimings,
                 frontier: list[dict], best_objective_history: list[float], elites: list[Elite],
                 process: dict | None = None, penalty_scale: dict | None = None) -> dict[str, Any]:
    """The content of result.json (version 1). `penalty_scale`: what λ means in this search
    (engine/penalty_scale.py's ObjectiveScale.to_json()); files written before it existed lack it."""
    return {
        "version": RESULT_VERSION,
        "config": config,
        "feature": feature.to_json(),
        "model": model,
        "sae": sae,
        "timings": timings.to_json(),
        "process": process or {"id": 0, "count": 1},
        "frontier": frontier,
        "best_objective_history": list(best_objective_history),
        "elites": [elite.to_json() for elite in elites],
        **({"penalty_scale": penalty_scale} if penalty_scale is not None else {}),
    }


def dataset_block(stats: Any, latent: int, acts: list[float]) -> dict[str, Any] | None:
    """How activations `acts` (an elite's act each) compare with latent `latent` on its dataset: the
    dataset's maximum, density and origin, each act as a multiple of that maximum (`ratios`: 1.24 is 24%
    above any dataset example) and its percentile among the dataset's activations (`percentiles`, 0..100,
    None without a histogram). `stats` is a DatasetStats (epo_tui.dataset_stats); None when it has no
    positive maximum for the latent."""
    top = stats.max(latent) if stats is not None else None
    if top is None or not top > 0:
        return None
    histogram = stats.histogram(latent)
    return {"latent": latent, "max": top, "density": stats.density(latent),
            "origin": stats.provenance.get("origin"), "ratios": [act / top for act in acts],
            "percentiles": [histogram.percentile(act) if histogram is not None else None for act in acts]}


def with_dataset(result: dict, stats: Any) -> dict:
    """`result` with a "dataset" entry (`dataset_block` of its elites) when it optimized one SAE latent
    whose dataset maximum `stats` knows; else `result` unchanged."""
    feature = result["feature"]
    if feature.get("kind") != "sae" or len(feature.get("indices") or []) != 1:
        return result
    block = dataset_block(stats, int(feature["indices"][0]), [e["act"] for e in result["elites"]])
    return {**result, "dataset": block} if block is not None else result


def write_result(folder: Path, result: dict) -> None:
    """report.md, then result.json, in `folder` (created), each written atomically: result.json comes
    last, so a folder with it holds both files whole (a batch rerun trusts exactly that)."""
    folder = Path(folder)
    write_text_atomic(folder / "report.md", render_report(result))
    write_json_atomic(folder / "result.json", result)


def read_result(folder: Path) -> dict | None:
    """folder/result.json as written by write_result; None when it is missing or not a result (a
    damaged file, or one from elsewhere)."""
    try:
        result = json.loads((Path(folder) / "result.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return result if isinstance(result, dict) and isinstance(result.get("config"), dict) else None


def finished(result: dict, folder: Path, feature: int) -> bool:
    """Whether `result` (read from `folder`) is feature `feature`'s search run to its end, with its
    report: what a batch rerun keeps instead of running that feature again."""
    try:
        return (result["version"] == RESULT_VERSION and result["feature"]["indices"] == [feature]
                and result["timings"]["interrupted"] is False and bool(result["elites"])
                and (Path(folder) / "report.md").is_file())
    except (KeyError, TypeError):
        return False


def best_elite(result: dict) -> dict:
    """The elite with the highest activation (first among ties)."""
    return max(result["elites"], key=lambda elite: elite["act"])


def summary(result: dict, folder: str) -> dict[str, Any]:
    """One feature's line in a batch index: its best elite and where its files are."""
    best = best_elite(result)
    start = best.get("prompt_start", 0)
    return {
        "feature": result["feature"]["indices"][0],
        "act": best["act"],
        "xent": best["xent"],
        "prompt": best.get("text", "".join(best["tokens"][start:])),
        "token_ids": best["token_ids"][start:],
        "iterations_run": result["timings"]["iterations_run"],
        "interrupted": result["timings"]["interrupted"],
        "process_id": result["process"]["id"],
        "folder": folder,
    }


def build_index(summaries: list[dict], *, model: str, sae: dict, features_requested: list[int],
                interrupted: bool, process: dict, dataset: Any = None) -> dict[str, Any]:
    """The content of index.json: one entry per feature that ran. With the SAE's dataset statistics
    (`dataset`, a DatasetStats), each entry gets its best act's `dataset_ratio` (None where the
    latent's maximum is unknown) and the entries go by that ratio, highest first, those without one
    after them; else by best activation."""
    entries = []
    for entry in summaries:
        block = dataset_block(dataset, entry["feature"], [entry["act"]]) if dataset is not None else None
        entries.append({**entry, "dataset_ratio": block["ratios"][0] if block else None}
                       if dataset is not None else dict(entry))
    entries.sort(key=lambda s: (s.get("dataset_ratio") is None, -(s.get("dataset_ratio") or 0.0), -s["act"],
                                s["feature"]))
    done = {s["feature"] for s in summaries}
    return {
        "version": INDEX_VERSION,
        "model": model,
        "sae": sae,
        "features_requested": list(features_requested),
        "features_missing": [f for f in features_requested if f not in done],
        "interrupted": interrupted,
        "written_by": process,
        "features": entries,
    }


def write_index(folder: Path, index: dict) -> None:
    folder = Path(folder)
    write_json_atomic(folder / "index.json", index)
    write_text_atomic(folder / "index.md", render_index(index))


# ----------------------------------------------------------------------------------------------
# Markdown


_HTML_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def md_text(text: str) -> str:
    """Text shown literally in GitHub markdown (paragraphs and table cells): control characters as
    visible escapes (`inert`), `& < >` as entities, every other ASCII punctuation backslash-escaped
    (CommonMark allows that for all of them, and GFM tables honour `\\|`)."""
    out = []
    for char in inert(text):
        if char in _HTML_ENTITIES:
            out.append(_HTML_ENTITIES[char])
        elif char in string.punctuation:
            out.append("\\" + char)
        else:
            out.append(char)
    # HTML collapses runs of spaces; keep them with no-break spaces after the first
    return "".join(out).replace("  ", " \u00a0")


def md_token(token: str) -> str:
    """A token in a table cell: spaces shown as '␣' (a cell's edges are trimmed), empty as '∅'."""
    return md_text(token).replace(" ", "␣").replace("\u00a0", "␣") or "∅"


def marked_prompt(tokens: list[str], activations: list[float]) -> str:
    """The tokens run together; each with activation > 0 in bold, followed by its value as a superscript.
    HTML tags rather than `**`: emphasis delimiters next to punctuation do not always render."""
    parts = []
    for token, act in zip(tokens, activations):
        text = md_text(token)
        parts.append(f"<b>{text}</b><sup>{act:.2f}</sup>" if act > 0 and token.strip() else text)
    return "".join(parts)


def number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def features_title(feature: dict) -> str:
    indices = ", ".join(str(i) for i in feature["indices"])
    if len(feature["indices"]) == 1:
        return f"feature {indices}"
    detail = f" (p={feature['lp_p']}, offset {feature['lp_offset']})" if feature["combine"] == "lp" else ""
    return f"features {indices} combined by {feature['combine']}{detail}"


def _timing_line(result: dict) -> str:
    t = result["timings"]
    search = result["config"]["search"]
    ran = f"{t['iterations_run']} of {t['iterations_requested']} iterations"
    if t["interrupted"]:
        head = f"Interrupted after {ran}"
    elif t.get("budget_ran_out"):
        head = f"Stopped by the time budget ({format_budget(t['time_budget_s'])}) after {ran}"
    else:
        head = ran.capitalize()
    detail = f" in {t['total_s']:.1f} s"
    if t["first_iteration_s"] is not None:
        detail += f" (first iteration {t['first_iteration_s']:.2f} s with compilation"
        detail += f", then {t['per_iteration_s']:.3f} s each)" if t["per_iteration_s"] is not None else ")"
    return (f"{head}{detail}. Seed {search['seed']}; {search['elites']} elites × {search['candidates']} "
            f"candidates; {search['prompt_tokens']} optimized tokens.")


def render_report(result: dict) -> str:
    """report.md: title, elites table, each elite's prompt marked by activation, the frontier."""
    feature, sae = result["feature"], result["sae"]
    lines = [
        f"# EPO: {features_title(feature)}",  # numbers and config choices only
        "",
        f"Model `{code_span(result['model'])}` · SAE `{code_span(sae['name'])}` at `{code_span(sae['hook'])}` · "
        f"target {md_text(feature['kind'])}, read at the {md_text(feature['read'])} token.",
        "",
        _timing_line(result),
        "",
        *_penalty_lines(result.get("penalty_scale")),
        *_dataset_lines(result.get("dataset")),
        "## Elites",
        "",
        *elites_table(result["elites"], result.get("dataset")),
    ]
    for k, elite in enumerate(result["elites"], 1):
        lines += elite_section(k, elite)
    lines += frontier_section(result["frontier"])
    return "\n".join(lines) + "\n"


def _penalty_lines(penalty_scale: dict | None) -> list[str]:
    """The report's sentence on what λ means (absent from results written before it was recorded)."""
    if not penalty_scale:
        return []
    return [f"Fluency penalty: {md_text(penalty_scale['description'])}.", ""]


def _dataset_lines(dataset: dict | None) -> list[str]:
    """The report's sentence on the dataset: its maximum, and how far the best elite got past it."""
    if not dataset:
        return []
    origin = f" ({md_text(dataset['origin'])})" if dataset.get("origin") else ""
    best = max(range(len(dataset["ratios"])), key=lambda k: dataset["ratios"][k], default=None)
    if best is None:
        return [f"Dataset maximum of latent {dataset['latent']}: {number(dataset['max'])}{origin}.", ""]
    percentile = dataset["percentiles"][best]
    above = f", above {percentile:.4g}% of its activations on the dataset" if percentile is not None else ""
    return [f"Dataset maximum of latent {dataset['latent']}: {number(dataset['max'])}{origin}; the best elite "
            f"reaches {dataset['ratios'][best]:.2f}× it{above}.", ""]


def elites_table(elites: list[dict], dataset: dict | None = None) -> list[str]:
    """One row per elite: λ, act, xent, the prompt's text (shared with the session export); with the
    dataset's comparison (`dataset_block`), also each act as a multiple of the dataset maximum and its
    percentile."""
    if dataset:
        lines = ["| # | λ | act | × dataset max | percentile | xent | prompt |",
                 "|---:|---:|---:|---:|---:|---:|---|"]
    else:
        lines = ["| # | λ | act | xent | prompt |", "|---:|---:|---:|---:|---|"]
    for k, elite in enumerate(elites, 1):
        text = elite.get("text", "".join(elite["tokens"][elite.get("prompt_start", 0):]))
        versus = ""
        if dataset:
            percentile = dataset["percentiles"][k - 1]
            versus = (f" {dataset['ratios'][k - 1]:.2f}× | "
                      f"{f'{percentile:.3g}' if percentile is not None else '–'} |")
        lines.append(f"| {k} | {elite['penalty']:.2f} | {number(elite['act'])} |{versus} {number(elite['xent'])} | "
                     f"{md_text(text)} |")
    return lines


def code_span(text: str) -> str:
    """Text for inside a `code span`: no backticks can close it, nothing else is interpreted."""
    return inert(str(text)).replace("`", "'")


def elite_section(k: int, elite: dict) -> list[str]:
    start = elite.get("prompt_start", 0)
    tokens, acts = elite["tokens"], elite["activations"]
    lines = ["", f"### Elite {k}: λ = {elite['penalty']:.2f}, act {number(elite['act'])}, "
                 f"xent {number(elite['xent'])}", "",
             marked_prompt(tokens[start:], acts[start:]), "",
             "<details><summary>Activation per token</summary>", ""]
    per_feature = elite.get("feature_activations", {})
    extra = "".join(f" act[{md_text(f)}] |" for f in per_feature)
    lines += [f"| pos | token | id | act |{extra}", "|---:|---|---:|---:|" + "---:|" * len(per_feature)]
    for pos, (token, token_id, act) in enumerate(zip(tokens, elite["token_ids"], acts)):
        cells = "".join(f" {number(values[pos])} |" for values in per_feature.values())
        where = "" if pos >= start else " (prefix)"
        lines.append(f"| {pos}{where} | {md_token(token)} | {token_id} | {number(act)} |{cells}")
    lines += ["", "</details>"]
    return lines


def frontier_section(frontier: list[dict]) -> list[str]:
    lines = ["", "## Frontier", "",
             "Every distinct prompt seen that no other beats on both fluency (lower xent) and objective.", "",
             "| xent | objective | act | prompt |", "|---:|---:|---:|---|"]
    for point in frontier:
        lines.append(f"| {number(point['xent'])} | {number(point['objective'])} | {number(point['act'])} | "
                     f"{md_text(point.get('text', ''))} |")
    return lines


def render_index(index: dict) -> str:
    """index.md: one row per feature, best activation first, linking to its report."""
    sae = index["sae"]
    lines = [f"# EPO batch: {len(index['features'])} features",
             "",
             f"Model `{code_span(index['model'])}` · SAE `{code_span(sae['name'])}` at `{code_span(sae['hook'])}`.",
             ""]
    if index["interrupted"] or index["features_missing"]:
        missing = ", ".join(str(f) for f in index["features_missing"]) or "none"
        lines += [f"Interrupted: features not run: {missing}.", ""]
    with_ratio = any("dataset_ratio" in entry for entry in index["features"])
    if with_ratio:
        lines += ["| feature | best act | × dataset max | xent | prompt | report |", "|---:|---:|---:|---:|---|---|"]
    else:
        lines += ["| feature | best act | xent | prompt | report |", "|---:|---:|---:|---|---|"]
    for entry in index["features"]:
        note = f" (stopped after {entry['iterations_run']} iterations)" if entry["interrupted"] else ""
        link = f"[{md_text(entry['folder'])}]({_link(entry['folder'])}/report.md)"
        ratio = entry.get("dataset_ratio")
        versus = (f" {ratio:.2f}× |" if ratio is not None else " – |") if with_ratio else ""
        lines.append(f"| {entry['feature']} | {number(entry['act'])} |{versus} {number(entry['xent'])} | "
                     f"{md_text(entry['prompt'])}{md_text(note)} | {link} |")
    return "\n".join(lines) + "\n"


def _link(folder: str) -> str:
    """A relative link target: our own folder names (feature-N), percent-encoded to be safe."""
    return quote(folder)
