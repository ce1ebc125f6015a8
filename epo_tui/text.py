"""Token text made inert for terminals and markdown: control characters and escape sequences
become visible escapes, so a token can never move the cursor, recolour the screen or inject markup."""

from __future__ import annotations

import json
import unicodedata

_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
_INERT_CATEGORIES = ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn")


def inert(text: str) -> str:
    """`text` with every control / format / separator character shown as a backslash escape."""
    out = []
    for char in text:
        if char in _NAMED:
            out.append(_NAMED[char])
        elif unicodedata.category(char) in _INERT_CATEGORIES:
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(char)
    return "".join(out)


def json_line(value) -> str:
    """`value` as one line of JSON: other scripts stay readable (no \\u escapes for them), but every
    control / format / separator character is escaped, so the line is inert on a terminal too."""
    text = json.dumps(value, ensure_ascii=False)
    return "".join(json.dumps(c)[1:-1] if unicodedata.category(c) in _INERT_CATEGORIES else c for c in text)
