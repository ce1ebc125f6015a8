"""English prose for the demo pack, from Debian documentation packages, split by document.

Sources (HTML books installed with apt-get, read from /usr/share/doc):
  * debian-handbook  "The Debian Administrator's Handbook", English edition (GPL-2+ or CC-BY-SA-3.0)
  * python3.X-doc    the Python documentation (PSF License 2; its examples Zero-Clause BSD)

Only paragraph elements are kept (DocBook `div.para`, Sphinx `p`); code blocks, tables, navigation,
tables of contents and indices are dropped. Paragraphs are whitespace-normalised, filtered for prose
and deduplicated. Each HTML page is one document; a page goes to the held-out split when a seeded hash
of its name falls below the held-out fraction, and held-out paragraphs that also occur in train are
dropped, so the LM never trains on any held-out paragraph.
"""

from __future__ import annotations

import glob
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import unicodedata
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

HANDBOOK_PACKAGE = "debian-handbook"
HANDBOOK_DIR = "/usr/share/doc/debian-handbook/html/en-US"
PYDOC_PACKAGES = ("python3.11-doc", "python3-doc")  # bookworm's versioned one first, then the default
PYDOC_GLOB = "/usr/share/doc/python3.*/html"
# Pages that are lists rather than prose (indices, changelogs, generated API tables).
PYDOC_SKIP = re.compile(r"(^|/)(genindex|py-modindex|search|contents|glossary|changelog|license|copyright)"
                        r"[^/]*\.html$|^(_\w+|whatsnew/changelog)")
HANDBOOK_SKIP = re.compile(r"^(index|ix\d+|pr\d+|Common_Content)")

SEED = 0
HELDOUT_FRACTION = 0.05
MIN_CHARS, MIN_WORDS = 40, 6

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source",
         "track", "wbr"}
_SKIP_TAGS = {"pre", "table", "script", "style", "nav", "head", "kbd", "math", "svg"}
_SKIP_CLASSES = {"navheader", "navfooter", "toc", "sphinxsidebar", "related", "footer", "highlight",
                 "docbook-toc", "indexterm", "breadcrumbs", "mobile-nav", "sidebar", "copyright"}
_TYPOGRAPHY = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'", "\u2013": "-",
                             "\u2014": " - ", "\u2026": "...", "\u00a0": " ", "\u00b6": ""})


class CorpusError(Exception):
    """The source text cannot be found or installed (a one-line reason)."""


class _Paragraphs(HTMLParser):
    """Collects the text of paragraph elements, skipping code, tables and navigation inside them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, skips, opens a paragraph)
        self.skip_depth = 0
        self.para_depth = 0
        self.buf: list[str] = []
        self.paragraphs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in _VOID:
            if tag == "br" and self.para_depth:
                self.buf.append(" ")
            return
        classes = set((dict(attrs).get("class") or "").split())
        skips = tag in _SKIP_TAGS or bool(classes & _SKIP_CLASSES)
        opens = not skips and self.para_depth == 0 and (tag == "p" or (tag == "div" and "para" in classes))
        self.stack.append((tag, skips, opens))
        self.skip_depth += skips
        self.para_depth += opens

    def handle_endtag(self, tag):
        if tag in _VOID or not any(t == tag for t, _, _ in self.stack):
            return
        while self.stack:  # close unclosed children too (HTML lets <p>, <li> go unclosed)
            t, skips, opens = self.stack.pop()
            self.skip_depth -= skips
            if opens:
                self.para_depth -= 1
                self.paragraphs.append("".join(self.buf))
                self.buf = []
            if t == tag:
                break

    def handle_data(self, data):
        if self.para_depth and not self.skip_depth:
            self.buf.append(data)


def clean_paragraph(text: str) -> str | None:
    """Normalised prose, or None for fragments, code-like lines and boilerplate."""
    text = unicodedata.normalize("NFKC", html.unescape(text)).translate(_TYPOGRAPHY)
    text = re.sub(r"\s*\u2192\s*\S+", "", text)  # the handbook's "→ https://..." link targets
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) < MIN_CHARS or len(text.split()) < MIN_WORDS:
        return None
    letters = sum(c.isalpha() for c in text)
    if letters < 0.6 * len(text) or not text.isascii() and sum(not c.isascii() for c in text) > 0.02 * len(text):
        return None
    if not re.search(r"[.!?:)\"']$", text):  # keep sentences, drop headings and labels
        return None
    return text


def paragraphs_of(path: str) -> list[str]:
    parser = _Paragraphs()
    with open(path, encoding="utf-8", errors="replace") as f:
        parser.feed(f.read())
    parser.close()
    return [p for p in (clean_paragraph(t) for t in parser.paragraphs) if p]


def _apt_install(packages: list[str]) -> None:
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise CorpusError(f"missing {' '.join(packages)} and cannot install it (needs apt-get as root): "
                          f"run 'apt-get install {' '.join(packages)}'")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["unknown error"])[-1]
            raise CorpusError(f"'{' '.join(cmd)}' failed: {last}")


def _package_version(package: str) -> str | None:
    done = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True)
    return done.stdout.strip() or None if done.returncode == 0 else None


def locate_sources(install: bool = True) -> dict[str, dict]:
    """{source: {dir, package, version, licence}}, installing the Debian packages when missing."""
    if not os.path.isdir(HANDBOOK_DIR) and install:
        _apt_install([HANDBOOK_PACKAGE])
    if not glob.glob(PYDOC_GLOB) and install:
        for package in PYDOC_PACKAGES:
            try:
                _apt_install([package])
                break
            except CorpusError:
                continue
    if not os.path.isdir(HANDBOOK_DIR):
        raise CorpusError(f"{HANDBOOK_DIR} not found: install the Debian package '{HANDBOOK_PACKAGE}'")
    pydocs = sorted(p for p in glob.glob(PYDOC_GLOB) if re.fullmatch(r"python3\.\d+", Path(p).parent.name))
    if not pydocs:
        raise CorpusError(f"no {PYDOC_GLOB} found: install the Debian package 'python3.11-doc'")
    pydoc = pydocs[0]
    pydoc_package = f"{Path(pydoc).parent.name}-doc"  # /usr/share/doc/python3.11/html is python3.11-doc's
    return {
        "debian-handbook": {"dir": HANDBOOK_DIR, "package": HANDBOOK_PACKAGE,
                            "version": _package_version(HANDBOOK_PACKAGE), "licence": "GPL-2.0+ OR CC-BY-SA-3.0",
                            "skip": HANDBOOK_SKIP},
        "python-doc": {"dir": pydoc, "package": pydoc_package, "version": _package_version(pydoc_package),
                       "licence": "PSF-2.0 (examples 0BSD)", "skip": PYDOC_SKIP},
    }


@dataclass
class Document:
    name: str  # source/relative path
    paragraphs: list[str]


def read_documents(sources: dict[str, dict]) -> list[Document]:
    docs = []
    for source, info in sorted(sources.items()):
        root = info["dir"]
        for path in sorted(glob.glob(os.path.join(root, "**", "*.html"), recursive=True)):
            rel = os.path.relpath(path, root)
            if info["skip"].search(rel):
                continue
            paragraphs = paragraphs_of(path)
            if paragraphs:
                docs.append(Document(f"{source}/{rel}", paragraphs))
    return docs


def is_heldout(name: str, seed: int = SEED, fraction: float = HELDOUT_FRACTION) -> bool:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_documents(docs: list[Document], seed: int = SEED,
                    fraction: float = HELDOUT_FRACTION) -> tuple[list[Document], list[Document]]:
    """(train, held-out): by document, deduplicated, held-out free of any train paragraph."""
    train, heldout = [], []
    for doc in docs:
        (heldout if is_heldout(doc.name, seed, fraction) else train).append(doc)
    seen: set[str] = set()

    def dedupe(group: list[Document]) -> list[Document]:
        out = []
        for doc in group:
            kept = [p for p in doc.paragraphs if not (p in seen or seen.add(p))]
            if kept:
                out.append(Document(doc.name, kept))
        return out

    train = dedupe(train)  # train first: held-out paragraphs seen in train are dropped
    return train, dedupe(heldout)


def write_split(path: Path, docs: list[Document]) -> None:
    """JSON lines, one document a line: {"name": ..., "text": paragraphs joined by newlines}."""
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"name": doc.name, "text": "\n".join(doc.paragraphs)}, ensure_ascii=False) + "\n")


def read_split(path: Path) -> list[str]:
    """The texts of a split written by write_split, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def build_corpus(out: Path, seed: int = SEED, install: bool = True) -> dict:
    """Writes out/train.jsonl, out/heldout.jsonl and out/manifest.json; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    sources = locate_sources(install)
    train, heldout = split_documents(read_documents(sources), seed)
    write_split(out / "train.jsonl", train)
    write_split(out / "heldout.jsonl", heldout)

    def stats(group: list[Document]) -> dict:
        text = "\n\n".join("\n".join(d.paragraphs) for d in group)
        return {"documents": len(group), "paragraphs": sum(len(d.paragraphs) for d in group),
                "bytes": len(text.encode()), "words": len(text.split()),
                "sha256": hashlib.sha256(text.encode()).hexdigest()}

    by_source = {}
    for name in sources:
        by_source[name] = {"train": stats([d for d in train if d.name.startswith(name + "/")]),
                           "heldout": stats([d for d in heldout if d.name.startswith(name + "/")])}
    manifest = {
        "seed": seed, "heldout_fraction": HELDOUT_FRACTION,
        "sources": {k: {f: v for f, v in info.items() if f != "skip"} for k, info in sources.items()},
        "train": stats(train), "heldout": stats(heldout), "by_source": by_source,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
