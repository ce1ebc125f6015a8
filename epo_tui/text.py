"""Token text made inert for terminals and markdown: control characters and escape sequences
become visible escapes, so a token can never move the cursor, recolour the screen or inject markup.

A token can also hold part of a UTF-8 character (byte-level BPE and byte-fallback tokenizers split
characters they have no token for into bytes): `token_text` shows each such byte as `\\xNN`, and
`inert` writes `\\xNN` only below 0x80, so a `\\x80`..`\\xff` always stands for a raw byte. A backslash
that the text itself holds shows as itself; where the bytes are known (`token_display`), the UI
styles the byte escapes apart from it.
"""

from __future__ import annotations

import json
import unicodedata

_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
_INERT_CATEGORIES = ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn")


def inert(text: str) -> str:
    """`text` with every control / format / separator character shown as a backslash escape: `\\n`,
    `\\t`, `\\r`, `\\xNN` below 0x80, else `\\uNNNN` / `\\UNNNNNNNN` (so `\\x80`..`\\xff` stay a byte's)."""
    out = []
    for char in text:
        if char in _NAMED:
            out.append(_NAMED[char])
        elif unicodedata.category(char) in _INERT_CATEGORIES:
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(char)
    return "".join(out)


def token_text(raw: bytes) -> str:
    """The text a token shows on its own, from its raw bytes: each complete UTF-8 character as itself,
    each byte that is not part of a complete character in `raw` (a piece of a character split over
    several tokens) as `\\xNN` in lowercase hex, e.g. b"\\xc3" -> `\\xc3`, b" \\xe2\\x98" -> ` \\xe2\\x98`."""
    return "".join(piece for piece, _ in token_pieces(raw))


def token_pieces(raw: bytes) -> list[tuple[str, bool]]:
    """`raw` as (text, is_byte) pieces in order: runs of complete UTF-8 characters (is_byte False) and
    one `\\xNN` per byte that is not part of a complete character (is_byte True)."""
    pieces = []
    while raw:
        try:
            pieces.append((raw.decode("utf-8"), False))
            break
        except UnicodeDecodeError as err:  # err.start..err.end: the bytes of no complete character
            if err.start:
                pieces.append((raw[:err.start].decode("utf-8"), False))
            pieces += [(f"\\x{byte:02x}", True) for byte in raw[err.start:err.end]]
            raw = raw[err.end:]
    return pieces


def token_display(token: str, raw_hex: str | None = None) -> list[tuple[str, bool]]:
    """A token ready to show, as inert (text, is_byte) pieces: from its raw bytes (hex, as in a
    `token_bytes` list) when given, so each `\\xNN` that stands for a byte can be styled apart from a
    backslash the text holds; else `token` (made by `token_text`), inert, as one piece."""
    if raw_hex is not None:
        try:
            raw = bytes.fromhex(raw_hex)
        except (TypeError, ValueError):  # a damaged file: the token's text still shows
            raw = None
        if raw is not None:
            return [(piece if is_byte else inert(piece), is_byte) for piece, is_byte in token_pieces(raw)]
    return [(inert(token), False)]


def json_line(value) -> str:
    """`value` as one line of JSON: other scripts stay readable (no \\u escapes for them), but every
    control / format / separator character is escaped, so the line is inert on a terminal too."""
    text = json.dumps(value, ensure_ascii=False)
    return "".join(json.dumps(c)[1:-1] if unicodedata.category(c) in _INERT_CATEGORIES else c for c in text)
