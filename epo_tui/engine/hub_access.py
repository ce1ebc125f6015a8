"""Whether the Hugging Face hub can be reached, asked once per process before the first download.

Without a network huggingface_hub retries every request with back-off: a model or SAE missing from the
cache took over 30 s and a dozen log lines to fail. When the hub's host does not even resolve, this
switches huggingface_hub to its cache alone (what HF_HUB_OFFLINE=1 does), so a cached model loads at
once and a missing one fails at once, in one line that says why.
"""

from __future__ import annotations

import os
import socket
import urllib.request
from urllib.parse import urlparse

_unreachable: list[str | None] = []  # the answer, once asked: why the hub cannot be reached, or None


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE asks huggingface_hub to use its cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def cache_only_if_unreachable() -> str | None:
    """Before a download: when the hub's host (HF_ENDPOINT's, else huggingface.co) does not resolve,
    huggingface_hub is set to use its cache only for the rest of the process. Returns why the hub is
    unreachable ("huggingface.co does not resolve"), or None when it may be reached, HF_HUB_OFFLINE is
    set already, or a proxy is configured (the proxy resolves the host, not this machine)."""
    if not _unreachable:
        _unreachable.append(None if hub_offline() else _resolution_failure())
        if _unreachable[0] is not None:
            from huggingface_hub import constants

            constants.HF_HUB_OFFLINE = True  # read at every request (constants.is_offline_mode)
    return _unreachable[0]


def _resolution_failure() -> str | None:
    from huggingface_hub import constants

    if urllib.request.getproxies():
        return None
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"{host} does not resolve"
    return None
