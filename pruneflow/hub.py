"""The Hugging Face Hub's offline switch, set for a process that cannot reach the Hub.

Without network, huggingface_hub retries every request five times with back-off
(about 30 s) before ``from_pretrained``/``load_dataset`` fall back to the local
cache or fail. When the Hub's host name does not even resolve, no request can
succeed, so pruneflow sets ``HF_HUB_OFFLINE`` for the process instead: cached files
load at once and a missing one fails at once, with the same message.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterator
from urllib.parse import urlparse

log = logging.getLogger(__name__)

ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
# The flags huggingface_hub and datasets read once, when they are imported.
IMPORTED_FLAGS = (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                  ("datasets.config", "HF_DATASETS_OFFLINE"))
# A proxy may resolve names this machine cannot, so with one set nothing is decided here.
PROXY_ENV = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
RESOLVE_TIMEOUT_S = 3.0


def is_offline(keys: tuple[str, ...] = ENV) -> bool:
    """Whether any of ``keys`` is set to a true value, as huggingface_hub reads them."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in keys)


def _set_flags(value: bool, import_missing: bool = False) -> list[tuple[object, str, object]]:
    """Set the copies of the flags that modules have read at import (a module imported later
    reads the environment); returns what they were. ``import_missing`` imports the modules
    first, so that restoring the returned values also restores a module first imported
    inside a temporary block."""
    saved = []
    for mod_name, attr in IMPORTED_FLAGS:
        mod = sys.modules.get(mod_name)
        if mod is None and import_missing:
            mod = importlib.import_module(mod_name)
        if mod is not None and hasattr(mod, attr):
            saved.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, value)
    return saved


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Forbid Hub downloads for the duration of the block; local files and the cache still work."""
    saved_env = {k: os.environ.get(k) for k in ENV}
    saved_attrs = _set_flags(True, import_missing=True)
    os.environ.update(dict.fromkeys(ENV, "1"))
    try:
        yield
    finally:
        for mod, attr, value in saved_attrs:
            setattr(mod, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def hub_host() -> str:
    """The host huggingface_hub talks to (``HF_ENDPOINT``, as it read it at import)."""
    from huggingface_hub import constants

    return urlparse(constants.ENDPOINT).hostname or "huggingface.co"


def resolves(host: str, timeout: float = RESOLVE_TIMEOUT_S) -> bool | None:
    """Whether ``host`` resolves: True, False (the resolver said no), or None (no answer in time)."""
    answer: list[bool] = []

    def look_up() -> None:
        try:
            socket.getaddrinfo(host, 443)
            answer.append(True)
        except socket.gaierror:
            answer.append(False)
        except OSError:
            pass

    thread = threading.Thread(target=look_up, daemon=True)  # getaddrinfo takes no timeout
    thread.start()
    thread.join(timeout)
    return answer[0] if answer else None


@functools.cache
def offline_if_unreachable() -> bool:
    """Before the first Hub access of a process: when the Hub's host does not resolve (and no
    proxy is set), switch the process to offline mode and say so once. Returns whether the
    process is offline."""
    if is_offline():
        return True
    if any(os.environ.get(k) for k in PROXY_ENV):
        return False
    host = hub_host()
    if resolves(host) is not False:
        return False
    os.environ.update(dict.fromkeys(ENV, "1"))
    _set_flags(True)
    log.warning("%s cannot be resolved (no network): loading from the local Hugging Face cache only "
                "(HF_HUB_OFFLINE=1 for this run), without the Hub's retries.", host)
    return True
