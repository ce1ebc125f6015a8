"""Each token's raw bytes, read from its tokenizer.

Decoding one id alone gives U+FFFD for a token that holds only part of a UTF-8 character (byte-level
BPE splits a character it has no token for into byte tokens; SentencePiece's byte fallback into
`<0xNN>` tokens), so the display (`text.token_text`) starts from the bytes instead:

- byte-level BPE (GPT-2, Llama 3, Qwen: a `ByteLevel` decoder): each character of the token string maps
  back to one byte through transformers' `bytes_to_unicode` table;
- SentencePiece pieces (Gemma, Llama 2: `ByteFallback`, `Metaspace` or `Replace` decoders): `<0xNN>`
  is byte NN, other pieces are their text with the decoder's replacements (`▁` -> space) applied;
- anything else, and added tokens: the id decoded alone, as UTF-8.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
SPACE_MARK = "\u2581"  # SentencePiece's "▁", Metaspace's default


def _decoder_steps(tokenizer) -> list[dict]:
    """The tokenizers decoder's configuration, a Sequence flattened into its steps ([] when none)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return []
    try:
        stack = [json.loads(decoder.__getstate__())]  # its JSON, as saved in tokenizer.json
    except (AttributeError, TypeError, ValueError):  # a custom decoder: ids are decoded instead
        return []
    steps = []
    while stack:
        step = stack.pop(0)
        if step.get("type") == "Sequence":
            stack[:0] = step.get("decoders", [])
        else:
            steps.append(step)
    return steps


class TokenBytes:
    """One tokenizer's raw bytes per token id, cached: called with ids, returns their bytes in order."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.added = {int(i) for i in tokenizer.added_tokens_decoder}
        steps = _decoder_steps(tokenizer)
        types = {step.get("type") for step in steps}
        self.byte_level = "ByteLevel" in types
        self.byte_fallback = "ByteFallback" in types
        # piece text -> text, in the decoder's order (Strip is left out: it trims a whole sequence's ends)
        self.replacements: list[tuple[str, str]] = []
        for step in steps:
            if step.get("type") == "Replace" and "String" in (step.get("pattern") or {}):
                self.replacements.append((step["pattern"]["String"], step.get("content", "")))
            elif step.get("type") == "Metaspace":
                self.replacements.append((step.get("replacement", SPACE_MARK), " "))
        if self.byte_level:
            from transformers.convert_slow_tokenizer import bytes_to_unicode

            self.byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        self.cache: dict[int, bytes] = {}

    def __call__(self, ids: Iterable[int]) -> list[bytes]:
        """The raw bytes of each of `ids`, in order."""
        ids = [int(i) for i in ids]
        missing = [i for i in dict.fromkeys(ids) if i not in self.cache]
        if missing:
            pieces = self.tokenizer.convert_ids_to_tokens(missing)
            for token_id, piece in zip(missing, pieces):
                self.cache[token_id] = self._bytes_of(token_id, piece)
        return [self.cache[i] for i in ids]

    def _bytes_of(self, token_id: int, piece: str | None) -> bytes:
        if token_id in self.added or piece is None:  # added tokens skip the decoder; None: past the vocabulary
            return self._decoded(token_id)
        if self.byte_level:
            try:
                return bytes(self.byte_of[char] for char in piece)
            except KeyError:  # not a byte-level piece after all
                return self._decoded(token_id)
        if self.byte_fallback and (match := _BYTE_PIECE.fullmatch(piece)):
            return bytes([int(match.group(1), 16)])
        if self.replacements or self.byte_fallback:
            for old, new in self.replacements:
                piece = piece.replace(old, new)
            return piece.encode("utf-8")
        return self._decoded(token_id)

    def _decoded(self, token_id: int) -> bytes:
        return self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False).encode("utf-8")
