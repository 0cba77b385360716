"""Where shipped defaults and per-user caches live.

The `data/` folder sits at the repository root and is shipped inside the wheel as
`refusal_atlas/data`; an editable install falls back to the repository copy.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    packaged = Path(__file__).resolve().parent / "data"
    if packaged.is_dir():
        return packaged
    repo = Path(__file__).resolve().parents[2] / "data"
    if repo.is_dir():
        return repo
    raise FileNotFoundError("refusal-atlas data folder not found; reinstall the package")


def default_taxonomy_dir() -> Path:
    return data_dir() / "taxonomy"


def conditions_file() -> Path:
    return data_dir() / "conditions.yaml"


def crosswalk_dir() -> Path:
    return data_dir() / "crosswalks"


def prompts_dir() -> Path:
    return data_dir() / "prompts"


def ontology_dir() -> Path:
    return data_dir() / "ontology"


def cache_dir() -> Path:
    """User cache (model safetensors copies, embeddings); override with REFUSAL_ATLAS_CACHE."""
    root = os.environ.get("REFUSAL_ATLAS_CACHE")
    path = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "refusal-atlas"
    path.mkdir(parents=True, exist_ok=True)
    return path
