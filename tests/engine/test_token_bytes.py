"""Tokens that hold part of a UTF-8 character (byte-level BPE, SentencePiece byte fallback) show each such
byte as `\\xNN`, never U+FFFD, and the same way in `score`, its `--json` (which keeps the raw bytes),
result.json, report.md, favorites and the UI; whole-prompt text stays the real text."""

from __future__ import annotations

import asyncio
import dataclasses
import html
import json
import re
from datetime import datetime, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from markdown_it import MarkdownIt
from rich.style import Style
from rich.text import Text
from textual.app import App
from textual.widgets import Static

from epo_tui import paths
from epo_tui.cli import main
from epo_tui.protocol import Elite, Scored
from epo_tui.text import inert, token_display, token_pieces, token_text
from epo_tui.themes import load_theme_file

TEXT = "naïve café ☕🙂"
# The demo pack's byte-level BPE has no token for ï, é, ☕ or 🙂: 11 tokens hold 2 + 2 + 3 + 4 of their bytes
DEMO_TOKENS = ["<|endoftext|>", "n", "a", "\\xc3", "\\xaf", "ve", " c", "a", "f", "\\xc3", "\\xa9", " ",
               "\\xe2", "\\x98", "\\x95", "\\xf0", "\\x9f", "\\x99", "\\x82"]
# The tiny helper's tokenizer (tests' session model) merges less: "v" "e"
TINY_TOKENS = ["<|endoftext|>", "n", "a", "\\xc3", "\\xaf", "v", "e", " c", "a", "f", "\\xc3", "\\xa9", " ",
               "\\xe2", "\\x98", "\\x95", "\\xf0", "\\x9f", "\\x99", "\\x82"]
# SentencePiece byte fallback (Gemma's tokenizer class, a small vocabulary): whole characters it has
# (ï, 日, "▁café") show as text with ▁ as a space; ☕ and 本 fall back to <0xNN> byte tokens
SP_TEXT = "naïve café ☕日本"
SP_TOKENS = ["<bos>", "n", "a", "ï", "v", "e", " café", " ", "\\xe2", "\\x98", "\\x95", "日",
             "\\xe6", "\\x9c", "\\xac"]
DARK = load_theme_file(paths.shipped_dir("themes") / "dark.toml")


def _joined_bytes(hexes: list[str]) -> str:
    return b"".join(bytes.fromhex(h) for h in hexes).decode("utf-8")  # strict: every byte in place


def _markdown_html(markdown: str) -> str:
    return MarkdownIt("commonmark").enable("table").render(markdown)


def _cell(token: str) -> str:
    """A token as its per-token table cell renders in HTML (report.md and favorites mark spaces ␣)."""
    return f"<td>{html.escape(token, quote=False).replace(' ', '␣')}</td>"


# ----------------------------------------------------------------------------------------------
# The display text of raw bytes


@pytest.mark.parametrize("raw, shown", [
    (b"\xc3", "\\xc3"),  # the first byte of ï / é
    (b"\xf0\x9f\x99", "\\xf0\\x9f\\x99"),  # 3 of 🙂's 4 bytes
    (b" \xe2\x98", " \\xe2\\x98"),  # a space, then 2 of ☕'s 3 bytes
    ("café".encode(), "café"),  # whole characters show as themselves
    (b"\xa9 ok", "\\xa9 ok"),
    (b"\\xc3", "\\xc3"),  # a backslash the text holds: the same characters (token_display tells them apart)
])
def test_token_text_shows_each_lone_byte_as_an_escape(raw, shown):
    assert token_text(raw) == shown


@given(st.binary(max_size=12))
def test_token_text_is_utf8_with_backslash_escapes_for_every_other_byte(raw):
    assert token_text(raw) == raw.decode("utf-8", errors="backslashreplace")
    assert "".join(piece for piece, _ in token_pieces(raw)) == token_text(raw)


def test_token_display_marks_byte_escapes_only():
    assert token_display("\\xc3", "c3") == [("\\xc3", True)]
    assert token_display("\\xc3", b"\\xc3".hex()) == [("\\xc3", False)]  # typed text, not a byte
    assert token_display(" \x1b\\xe2", "201be2") == [(" \\x1b", False), ("\\xe2", True)]  # controls inert
    assert token_display("\x1bx", None) == [("\\x1bx", False)]  # no bytes known: the string, inert
    assert token_display("\x1bx", "zz") == [("\\x1bx", False)]  # damaged hex: the same


# ----------------------------------------------------------------------------------------------
# `score` on byte-level BPE (the demo pack) and SentencePiece byte fallback (a Gemma tokenizer)


def test_score_on_byte_level_bpe_shows_lone_bytes_in_the_table_and_json(capsys):
    assert main(["score", "--demo", "--json", TEXT]) == 0
    out = capsys.readouterr().out
    scored = json.loads(out)
    assert scored["tokens"] == DEMO_TOKENS and "\ufffd" not in out
    lone = [i for t, i in zip(scored["tokens"], scored["token_ids"]) if t.startswith("\\x")]
    assert len(lone) == 11 and len(set(lone)) == 10  # the count (ï and é share their first byte)
    assert _joined_bytes(scored["token_bytes"]) == "<|endoftext|>" + TEXT
    assert [token_text(bytes.fromhex(h)) for h in scored["token_bytes"]] == scored["tokens"]

    assert main(["score", "--demo", TEXT]) == 0
    table = capsys.readouterr().out
    rows = table.splitlines()[1:len(DEMO_TOKENS) + 1]
    assert all(row.split()[0] == str(pos) and f"'{token}'" in row
               for pos, (token, row) in enumerate(zip(DEMO_TOKENS, rows)))
    assert "\ufffd" not in table


@pytest.fixture(scope="module")
def byte_fallback_config(tmp_path_factory) -> str:
    """A tiny Gemma checkpoint and SAE whose tokenizer is transformers' GemmaTokenizer (BPE with byte
    fallback, decoder Replace ▁ / ByteFallback / Fuse) over a small vocabulary with all 256 <0xNN>."""
    from transformers import GemmaTokenizer

    from epo_tui.engine.sae_writer import write_random_sae
    from epo_tui.engine.tiny import write_config, write_tiny_checkpoint

    folder = tmp_path_factory.mktemp("byte-fallback")
    write_tiny_checkpoint(folder / "model", "gemma")
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    vocab.update({f"<0x{b:02X}>": 5 + b for b in range(256)})
    for piece in ["▁", *"naïvecfé", "日", "▁c", "af", "▁caf", "▁café"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "c"), ("a", "f"), ("▁c", "af"), ("▁caf", "é")]
    GemmaTokenizer(vocab=vocab, merges=merges).save_pretrained(folder / "model")  # replaces the BPE one
    write_random_sae(folder / "sae", d_in=32, d_sae=64, hook_name="blocks.1.hook_resid_pre", input_norm=0.65)
    return str(write_config(folder / "config.toml", "model", "sae"))


def test_score_on_sentencepiece_byte_fallback_shows_lone_bytes(byte_fallback_config, capsys):
    from transformers import AutoTokenizer

    assert main(["score", "--config", byte_fallback_config, "--json", SP_TEXT]) == 0
    out = capsys.readouterr().out
    scored = json.loads(out)
    assert scored["tokens"] == SP_TOKENS and "\ufffd" not in out
    assert _joined_bytes(scored["token_bytes"]) == "<bos>" + SP_TEXT
    tokenizer = AutoTokenizer.from_pretrained(byte_fallback_config.replace("config.toml", "model"))
    assert tokenizer.convert_ids_to_tokens(scored["token_ids"][8]) == "<0xE2>"  # what the tokenizer holds
    assert tokenizer.decode(scored["token_ids"][8:9]) == "\ufffd"  # and what decoding it alone gave


def test_feature_list_shows_top_tokens_as_score_does(tiny_dir, capsys):
    config = str(tiny_dir / "config.toml")
    assert main(["features", "--config", config, "--json", "--limit", "4"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    lone = [t for r in rows for t in r["top_tokens"] if re.fullmatch(r"(\\x[89a-f][0-9a-f])+", t)]
    assert lone and not any("\ufffd" in t for r in rows for t in r["top_tokens"])  # the tiny vocabulary is mostly bytes
    assert main(["features", "--config", config, "--limit", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{r['index']:>7}  " + "  ".join(f"'{inert(t)}'" for t in r["top_tokens"]) for r in rows]


# ----------------------------------------------------------------------------------------------
# The same strings from a search: result.json, report.md, favorites


def test_report_and_favorite_show_the_strings_score_shows(tiny_pair, tiny_config):
    from epo_tui import favorites, results
    from epo_tui.engine.reporting import result_of
    from epo_tui.engine.scoring import score_text
    from epo_tui.engine.search import Search

    n_tokens = len(tiny_pair.model.tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    config = dataclasses.replace(tiny_config, search=dataclasses.replace(
        tiny_config.search, prompt_tokens=n_tokens, elites=2, candidates=4, prefix=""))
    search = Search(tiny_pair, config)
    result = result_of(search, search.initial_state(TEXT), results.RunTimings(iterations_requested=1))
    elite = result["elites"][0]  # the seed prompt fills every position: the elite is TEXT
    assert elite["tokens"] == TINY_TOKENS and elite["text"] == TEXT
    assert _joined_bytes(elite["token_bytes"]) == "<|endoftext|>" + TEXT
    scored = score_text(tiny_pair, TEXT, tiny_config.feature.index)
    assert (scored["tokens"], scored["token_bytes"]) == (elite["tokens"], elite["token_bytes"])

    report = results.render_report(result)
    marked = results.marked_prompt(elite["tokens"][1:], elite["activations"][1:])  # bold where it fires
    saved = datetime(2026, 1, 2, tzinfo=timezone.utc)
    entry = favorites.render_entry(favorites.favorite_from_elite({"id": "s1"}, Elite.from_json(elite), saved=saved))
    for markdown in (report, entry):
        assert "\ufffd" not in markdown
        page = _markdown_html(markdown)
        for pos, token in enumerate(TINY_TOKENS[1:], 1):  # the per-token table: \xNN stays literal
            assert f">{pos}</td>\n{_cell(token)}" in page, token
        assert marked in markdown
    assert re.sub(r"<sup>.*?</sup>|</?b>|</?p>|\n", "", _markdown_html(marked)) == "".join(TINY_TOKENS[1:])
    assert f"~~~text\n{TEXT}\n~~~" in entry  # the prompt itself: real text


# ----------------------------------------------------------------------------------------------
# The UI: elites pane, `d` details and scratchpad dim the byte escapes, not a typed backslash


TYPED = "\\xc3"  # what a user may type: four characters, one token here
UI_TOKENS = ["<|endoftext|>", "\\xc3", "\\xaf", TYPED]
UI_BYTES = [b"<|endoftext|>".hex(), "c3", "af", TYPED.encode().hex()]


def _dim_ranges(text: Text) -> list[tuple[int, int]]:
    return [(s.start, s.end) for s in text.spans if isinstance(s.style, Style) and s.style.dim]


def test_activation_text_dims_byte_escapes_and_keeps_the_activation_colour():
    from epo_tui.tui.tokens import activation_text

    text = activation_text(UI_TOKENS, [0.0, 2.0, 0.0, 1.0], 1, DARK, token_bytes=UI_BYTES)
    assert text.plain == "\\xc3\\xaf\\xc3"
    assert _dim_ranges(text) == [(0, 4), (4, 8)]  # the typed \xc3 (8..12) is not dim
    coloured = [s for s in text.spans if s.style.bgcolor is not None]
    assert [(s.start, s.end) for s in coloured] == [(0, 4), (8, 12)]
    assert activation_text(UI_TOKENS, [0.0] * 4, 1, DARK).spans == []  # no bytes (older files): plain


class _Host(App):
    def __init__(self, screen):
        super().__init__()
        self.first = screen

    def on_mount(self) -> None:
        self.push_screen(self.first)


def test_elites_pane_details_and_scratchpad_dim_byte_escapes():
    from epo_tui.tui.components.elites import ElitesPane
    from epo_tui.tui.screens.prompts import Scratchpad

    elite = Elite(penalty=1.0, token_ids=[0, 1, 2, 3], tokens=UI_TOKENS, token_bytes=UI_BYTES,
                  activations=[0.0, 2.0, 0.0, 1.0], act=1.0, xent=3.0, objective=0.0, prompt_start=1,
                  text="ï" + TYPED)
    scored = Scored(feature=0, tokens=UI_TOKENS, token_bytes=UI_BYTES, token_ids=[0, 1, 2, 3],
                    activations=[0.0, 2.0, 0.0, 1.0], xent=[None, 1.0, 1.0, 1.0], prompt_start=1)

    async def fake_score(text: str, feature: int) -> Scored:
        return scored

    async def scenario():
        app = _Host(Scratchpad(DARK, 0, fake_score))
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("x")
            result = app.screen.query_one("#scratch-result", Static)
            for _ in range(200):  # the scratchpad scores 0.25 s after the last keystroke
                if app.screen.last_scored is not None:
                    break
                await pilot.pause(0.05)
            shown = result.content
            assert shown.plain.startswith("\\xc3\\xaf\\xc3\n") and _dim_ranges(shown) == [(0, 4), (4, 8)]

            pane = ElitesPane(DARK)
            await app.screen.mount(pane)
            pane.update_elites([elite])
            await pilot.pause()
            prompt = pane.table.get_row_at(0)[3]
            assert prompt.plain == "\\xc3\\xaf\\xc3" and _dim_ranges(prompt) == [(0, 4), (4, 8)]
            table = pane.details(0).renderables[1]
            cells = list(table.columns[1].cells)
            assert [c.plain for c in cells] == ["\\xc3", "\\xaf", TYPED]
            assert [_dim_ranges(c) for c in cells] == [[(0, 4)], [(0, 4)], []]

    asyncio.run(scenario())

