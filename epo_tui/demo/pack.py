"""The `pack` stage: copies a finished build into the package (`epo_tui/demo/pack/`).

What `--demo` loads is a plain config.toml next to the model, SAE and labels folders, so the engine
reads the pack exactly as it reads any local checkpoint and sae-lens folder. The held-out sample is
verbatim text of the source books, so a NOTICE.md with their licences travels with it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from epo_tui.atomic import write_text_atomic

MAX_PACK_BYTES = 25_000_000
# Files copied from the build folder (relative paths, the same in the pack).
PACK_FILES = (
    "model/config.json", "model/model.safetensors", "model/tokenizer.json", "model/tokenizer_config.json",
    "model/training_report.json",
    "sae/cfg.json", "sae/sae_weights.safetensors", "sae/sparsity.safetensors", "sae/training_report.json",
    "labels/explanations.jsonl",
    "corpus/heldout.jsonl",
)
# Where a build file lands in the pack when its folder changes (flat files are simpler to name in a config).
RENAMES = {"labels/explanations.jsonl": "explanations.jsonl", "corpus/heldout.jsonl": "heldout.jsonl"}
# The feature `--demo` starts on: latent 524 ("Debian") climbs visibly within 40 iterations and reads
# at a glance; chosen by hand from the labels of the seeded build.
DEFAULT_FEATURE = 524
DEMO_ITERATIONS = 300
# 300 iterations take about 4 minutes on 2 CPU cores: the demo stops after two minutes of wall clock (the
# search's set-up included) unless it finishes sooner, as on a GPU
DEMO_TIME_BUDGET = "2m"
# Children per elite: on this small model an iteration costs about its children, so 32 run about 4
# times the iterations of the seed's 128 in the same wall clock, and beat more dataset maxima in 30 s
# (`bench --quality --demo --time-budget 30s`: 18 of 20 latents against 15 of 20, README)
DEMO_CANDIDATES = 32
# Optimized tokens: on this model the latents of a common word in a long context (a comma in a
# docstring, "used" in "may be used with") grow with the text before it, and the seed's 20 tokens held
# them under their held-out maxima; 28 tokens beat more of them at the cost of about 40% of the
# iterations (`bench --quality --demo`, seeds 0, 1, 2: 19, 18 and 20 of 20 latents, against 18, 18
# and 17 with 20 tokens and λ from 1; README)
DEMO_PROMPT_TOKENS = 28
# The smallest λ: from 0.5 the most active elite may spend up to the held-out limit's xent on a latent
# that is near its maximum (bench --quality --demo, README)
DEMO_PENALTY_MIN = 0.5


class PackError(Exception):
    """The build folder is incomplete or the pack would be too large."""


def config_text(default_feature: int, label: str | None) -> str:
    note = f"  # {label}" if label else ""
    return f"""\
# The bundled demo pack: a 4-layer GPT-2 trained on the Python documentation and the Debian
# Administrator's Handbook, with a 2048-latent SAE on its residual stream before layer 2, labels made
# automatically from top-activating snippets, and a held-out sample of the same books.
# `epo-tui --demo` (and --demo on every command) loads this file. Built by `python -m epo_tui.demo.build`.

[model]
path = "model"

[sae]
path = "sae"
labels = "explanations.jsonl"        # Neuronpedia's explanation-export layout

[feature]
index = {default_feature}{note}

[search]
iterations = {DEMO_ITERATIONS}                     # about 4 minutes on 2 CPU cores, so the demo stops sooner:
time_budget = "{DEMO_TIME_BUDGET}"                   # after two minutes of wall clock, whichever comes first
candidates = {DEMO_CANDIDATES}                      # per elite: a small model gains more from iterations
prompt_tokens = {DEMO_PROMPT_TOKENS}                   # room for latents that need context before their token
penalty_min = {DEMO_PENALTY_MIN}                    # λ 0.5..20 (the default starts at 1)
"""


def notice_text(manifest: dict) -> str:
    sources = manifest["sources"]
    handbook, pydoc = sources["debian-handbook"], sources["python-doc"]
    heldout = manifest["heldout"]
    return f"""\
# Notice: what this pack is made of, and its licences

Everything here was made by `python -m epo_tui.demo.build` from two Debian documentation packages:

* The Debian Administrator's Handbook (Debian package `{handbook['package']}` {handbook['version']}),
  by Raphaël Hertzog and Roland Mas, licensed under the GNU GPL version 2 or later, or CC BY-SA 3.0.
* The Python documentation (Debian package `{pydoc['package']}` {pydoc['version']}),
  Copyright © Python Software Foundation, licensed under the PSF License Version 2 (its code examples
  under the Zero-Clause BSD licence).

`model/` (a GPT-2 language model and its tokenizer) and `sae/` (a sparse autoencoder) were trained on
text from both; `explanations.jsonl` holds labels made automatically from that training text (they
quote short snippets of it, under the same licences).

`heldout.jsonl` is verbatim text of {heldout['documents']} pages of those books ({heldout['bytes']:,}
bytes; the page each line comes from is its `name`). Pages named `debian-handbook/...` are from the
Handbook (GPL-2+ or CC BY-SA 3.0, authors as above); pages named `python-doc/...` are from the Python
documentation (Copyright © Python Software Foundation, PSF License Version 2). The model and the SAE
never trained on it.
"""


def build_pack(out: Path, dest: Path, default_feature: int = DEFAULT_FEATURE, log=print) -> dict:
    """OUT (a finished build) -> dest: the files, config.toml and NOTICE.md; returns sizes."""
    missing = [name for name in PACK_FILES if not (out / name).is_file()]
    if missing:
        raise PackError(f"{out / missing[0]} is missing: run the earlier stages first")
    total = sum((out / name).stat().st_size for name in PACK_FILES)
    if total > MAX_PACK_BYTES:
        raise PackError(f"the pack would be {total / 1e6:.1f} MB, over the {MAX_PACK_BYTES / 1e6:.0f} MB budget")
    label = _label_of(out / "labels" / "explanations.jsonl", default_feature)
    if dest.exists():
        shutil.rmtree(dest)
    for name in PACK_FILES:
        target = dest / RENAMES.get(name, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / name, target)
    write_text_atomic(dest / "config.toml", config_text(default_feature, label))
    manifest = json.loads((out / "corpus" / "manifest.json").read_text())
    write_text_atomic(dest / "NOTICE.md", notice_text(manifest))
    for path in dest.rglob("*"):
        if path.is_file():
            path.chmod(0o644)  # the pack is read by every user, whatever the umask of whoever built it
    sizes = {str(p.relative_to(dest)): p.stat().st_size for p in sorted(dest.rglob("*")) if p.is_file()}
    report = {"dest": str(dest), "bytes": sum(sizes.values()), "files": sizes, "default_feature": default_feature}
    log(f"pack: {len(sizes)} files, {report['bytes'] / 1e6:.1f} MB in {dest}; default feature {default_feature}"
        + (f" ({label})" if label else ""))
    return report


def _label_of(explanations: Path, index: int) -> str | None:
    for line in explanations.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            if int(record["index"]) == index:
                return record["description"].replace("\n", " ")
    return None
