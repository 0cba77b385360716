"""Loading a sentence-transformers model without transformers' per-load "Loading weights" bar.

Both the embedder and the refusal detector load MiniLM, in well under a second, on every `curate`
command and run stage; the bar they drew was noise between the progress that matters. The
global switch is put back afterwards, so loading the analysed model still shows its bar.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def quiet_weight_loading() -> Iterator[None]:
    # heavy dependency (slow to import), loaded only when this runs
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_sentence_transformer(path: str, device: str = "cpu") -> Any:
    """A SentenceTransformer from `path` (a folder or hub id), loaded quietly."""
    # heavy import (torch, transformers), deferred to first use
    from sentence_transformers import SentenceTransformer

    with quiet_weight_loading():
        return SentenceTransformer(path, device=device)
