"""`feature_report(store, id)`: one SAE latent of the run's SAE — which nodes selected it and why, what it
does when clamped; `node_features(store, node)`: the latents a node selected (for `node_report`).

Text from the atlas (top-activating contexts, promoted tokens) is returned as plain strings: the CLI
prints them as rich `Text` and the report HTML-escapes them.
"""

from __future__ import annotations

from typing import Any

from refusal_atlas.atlas.query.common import _clean, _records
from refusal_atlas.atlas.sae_read import sae_view
from refusal_atlas.atlas.store import RUN_HINT, AtlasStore
from refusal_atlas.errors import AtlasError

__all__ = ["FEATURE_COLUMNS", "feature_report", "node_features", "node_sae", "parse_feature_id", "sae_summary"]

FEATURE_COLUMNS = ("rank", "feature", "decoder_cosine", "attribution", "attribution_se", "mean_act_node",
                   "mean_act_harmless", "top_contexts", "promoted_tokens")
SUMMARY_KEYS = ("model", "layer", "width", "k", "tokens", "fvu", "l0", "dead_fraction", "sae_sha256", "selected_by",
                "seconds")


def _listify(row: dict[str, Any]) -> dict[str, Any]:
    """Parquet list cells come back as numpy arrays: plain lists of str for JSON."""
    for key in ("top_contexts", "promoted_tokens", "nodes", "shared"):
        if key in row and row[key] is not None and not isinstance(row[key], str):
            row[key] = [v if isinstance(v, str) else _clean(v) for v in list(row[key])]
    return row


def sae_summary(store: AtlasStore) -> dict[str, Any] | None:
    """The run's SAE in a few figures (None when the sae stage has not run)."""
    summary = sae_view(store).summary
    if summary is None:
        return None
    return _clean({k: summary.get(k) for k in SUMMARY_KEYS})


def parse_feature_id(text: str | int) -> int:
    """A latent index from user text (`123`, `f123`, `#123`); anything else is a one-line error."""
    raw = str(text).strip().lstrip("#fF")
    if not raw.isdigit():
        raise AtlasError(f"feature id {str(text)!r}: give the latent's index, a whole number such as 123")
    return int(raw)


def node_features(store: AtlasStore, node_id: str) -> list[dict[str, Any]] | None:
    """The node's selected latents in rank order (None when the sae stage has not run)."""
    df = sae_view(store).features
    if df is None:
        return None
    if "node" not in df.columns:
        return []
    rows = df[df["node"].astype(str) == node_id].sort_values("rank")
    cols = [c for c in FEATURE_COLUMNS if c in rows.columns]
    return [_listify(r) for r in _records(rows[cols])]


def feature_report(store: AtlasStore, feature: str | int) -> dict[str, Any]:
    """Everything the atlas holds about one latent of the run's SAE."""
    fid = parse_feature_id(feature)
    view = sae_view(store)
    summary = sae_summary(store)
    if summary is None or view.features is None:
        raise AtlasError(f"{store.root}: no SAE features in this atlas (the sae stage has not run); {RUN_HINT}")
    width = summary.get("width")
    if isinstance(width, int) and not 0 <= fid < width:
        raise AtlasError(f"feature {fid}: out of range; this atlas's SAE has latents 0..{width - 1}")
    df = view.features
    rows = df[df["feature"].astype(int) == fid].sort_values(["rank", "node"]) if len(df) else df
    selections = [_listify(r) for r in _records(rows)]
    nodes = [str(r["node"]) for r in selections]
    out: dict[str, Any] = {"feature": fid, "sae": summary, "selected_by": nodes,
                           "labels": {n: store.node_label(n) for n in nodes}, "selections": selections}
    if selections:  # the latent's own evidence is the same in every node's row
        first = selections[0]
        out["top_contexts"] = first.get("top_contexts") or []
        out["promoted_tokens"] = first.get("promoted_tokens") or []
    shared = view.shared
    if shared is not None and len(shared) and "feature" in shared.columns:
        hit = shared[shared["feature"].astype(int) == fid]
        out["shared"] = bool(hit.iloc[0]["shared"]) if len(hit) else False
    clamp = view.clamp
    out["clamp"] = (_records(clamp[clamp["source"].astype(str).isin(nodes)]) if clamp is not None and len(clamp)
                    and "source" in clamp.columns else [])
    out["note"] = (None if nodes else "no node selected this latent: the atlas keeps only the selected latents' "
                   "evidence (`refusal-atlas sae features` lists them)")
    return _clean(out)


def node_sae(store: AtlasStore, node_id: str) -> dict[str, Any] | None:
    """For `node_report`: the node's selected latents and the cross-clamp rows of its K* set (None: not run)."""
    features = node_features(store, node_id)
    if features is None:
        return None
    clamp = sae_view(store).clamp
    rows = _records(clamp[clamp["source"].astype(str) == node_id]) if clamp is not None and len(clamp) and \
        "source" in clamp.columns else []
    return {"layer": (sae_view(store).summary or {}).get("layer"), "features": features, "clamp": rows}
