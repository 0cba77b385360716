"""What a model spec that is not a local file names, and whether the Hugging Face Hub may be asked for it.

A spec that is written like a path (`./x`, `/x`, `~/x`, `a/b/c`) but is not on disk is "not found",
never a hub id: sending it to the hub only produced a confusing repo-id message. A hub id is
looked up in the local cache only (never over the network) when offline mode is on or the hub's
host cannot be reached, so an offline machine gets one line at once instead of the client's
five retries with back-off.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from refusal_atlas.errors import AtlasError

_TRUE = {"1", "on", "yes", "true"}
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
PROBE_TIMEOUT_S = 3.0


def looks_like_path(spec: str) -> bool:
    """True for specs only a file system can mean: hub ids are `name` or `owner/name`."""
    if spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1 or os.path.isabs(spec):
        return True
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return True
    return False


def not_found(spec: str) -> AtlasError:
    return AtlasError(
        f"{spec}: model not found (no such folder or file; a Hugging Face hub id looks like owner/name)"
    )


def offline_mode() -> bool:
    """Whether the user switched the hub off (read now, not when huggingface_hub was imported)."""
    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().lower()
    return env in _TRUE or bool(hub_constants.HF_HUB_OFFLINE)


def hub_unreachable() -> str | None:
    """Why the hub's host cannot be reached (DNS or TCP, a few seconds at most), or None if it can.

    Behind a proxy a direct connection proves nothing, so the check is skipped there and the
    hub client's own error stands.
    """
    if any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return None
    endpoint = os.environ.get("HF_ENDPOINT") or hub_constants.ENDPOINT
    url = urlparse(endpoint)
    host = url.hostname or endpoint
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as exc:
        return f"{host}:{port} cannot be reached ({exc.strerror or type(exc).__name__})"


def hub_cache() -> Path:
    """The hub cache folder, read now so that a changed HF_HUB_CACHE is honoured."""
    return Path(os.environ.get("HF_HUB_CACHE") or hub_constants.HF_HUB_CACHE)


def cached_commit(repo_id: str) -> str | None:
    """The commit of the cached snapshot a hub id was loaded from (transformers 5 no longer records it)."""
    path = try_to_load_from_cache(repo_id, "config.json", cache_dir=hub_cache())
    if not isinstance(path, str):
        return None
    return Path(path).parent.name


def not_cached(spec: str, why_local_only: str) -> AtlasError:
    """The one-line error for a hub id that is not in the cache while the hub may not be asked."""
    return AtlasError(
        f"{spec}: not a local folder and not in the Hugging Face cache ({hub_cache()}); {why_local_only}"
    )


OFFLINE_ADVICE = (
    "offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE): unset both to download it, "
    "or pass the path of a downloaded model folder"
)


def unreachable_advice(reason: str) -> str:
    return f"{reason}: connect to the network to download it, or pass the path of a downloaded model folder"
