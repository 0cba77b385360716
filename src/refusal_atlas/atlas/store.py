"""Typed, lazy, read-only access to an atlas output folder (what `refusal-atlas run` writes).

Every stage writes its own files; the store only reads them, each on first use, and tolerates
stages that have not run: the `has_*` checks and `None` / empty results say so instead of raising,
so the report and the queries can show "not run" for a missing section. Only `AtlasStore.open`
raises, when the folder itself is missing, with the one-line advice to run `refusal-atlas run`.

File discovery is deliberately tolerant (a few candidate names or globs per artefact) because
each stage's writer is owned by another module; column names of the causal and cluster tables
are normalised to the canonical ones documented on each accessor.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from refusal_atlas.errors import AtlasError

RUN_HINT = "run `refusal-atlas run` first (or pass --atlas DIR)"
TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AtlasError(f"{path}: unreadable JSON ({exc}); rerun the stage that writes it") from exc


def read_any_table(path: Path) -> pd.DataFrame:
    """A table from Parquet, CSV, JSONL or a JSON list of records (by extension)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix == ".csv":
            return pd.read_csv(path)
        if suffix == ".jsonl":
            return pd.read_json(path, lines=True)
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                for key in ("rows", "records", "table", "data"):
                    if isinstance(data.get(key), list):
                        return pd.DataFrame(data[key])
                return pd.DataFrame([data])
            return pd.DataFrame(data)
    except (OSError, ValueError) as exc:
        raise AtlasError(f"{path}: unreadable table ({exc}); rerun the stage that writes it") from exc
    raise AtlasError(f"{path}: unsupported table format {suffix!r}")


def rename_aliases(df: pd.DataFrame, aliases: dict[str, Sequence[str]]) -> pd.DataFrame:
    """Rename the first present alias of each canonical column to the canonical name."""
    mapping: dict[str, str] = {}
    for canonical, names in aliases.items():
        if canonical in df.columns:
            continue
        for name in names:
            if name in df.columns and name not in mapping:
                mapping[name] = canonical
                break
    return df.rename(columns=mapping) if mapping else df


def _first_existing(root: Path, patterns: Iterable[str]) -> Path | None:
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            hits = sorted(p for p in root.glob(pattern) if p.is_file() and not p.name.startswith("."))
            if hits:
                return hits[0]
        elif (root / pattern).is_file():
            return root / pattern
    return None


def _table(root: Path, stems: Sequence[str]) -> Path | None:
    """The first `<stem><suffix>` that exists (stems may contain a sub-folder and globs)."""
    return _first_existing(root, [f"{stem}{suffix}" for stem in stems for suffix in TABLE_SUFFIXES])


# Canonical column names of the tables the report and the queries read.
CROSS_ABLATION_ALIASES: dict[str, Sequence[str]] = {
    "ablated": ("ablated_node", "direction", "source", "intervention", "ablate", "row"),
    "evaluated": ("eval_node", "target", "target_node", "prompts_node", "node", "column", "on"),
    "refusal_rate": ("refusal", "rate", "refused", "refusal_after", "refusal_rate_after"),
    "refusal_before": ("refusal_rate_baseline", "baseline", "baseline_refusal_rate", "refusal_rate_before"),
    "refusal_score": ("score", "logit_score", "refusal_logodds"),
    "harmless_kl": ("kl", "kl_harmless", "harmless_kl_mean"),
}
STEERING_ALIASES: dict[str, Sequence[str]] = {
    "node": ("direction", "source", "steered_node"),
    "layer": ("steer_layer",),
    "induced_refusal_rate": ("refusal_rate", "induced", "rate", "refused"),
}
CONDITION_ALIASES: dict[str, Sequence[str]] = {
    "node": ("node_id",),
    "condition": ("context", "when", "condition_value"),
    "refusal_rate": ("rate", "refused"),
    "ci_low": ("refusal_ci_low", "lo", "ci_lo", "low"),
    "ci_high": ("refusal_ci_high", "hi", "ci_hi", "high"),
    "projection": ("projection_mean", "proj", "mean_projection"),
    "expected": ("expected_behaviour", "behaviour"),
    "n": ("count", "n_prompts"),
}
ASSIGNMENT_ALIASES: dict[str, Sequence[str]] = {
    "cluster": ("cluster_id", "label_id", "topic"),
    "x": ("umap_x", "x2d", "map_x"),
    "y": ("umap_y", "y2d", "map_y"),
}
MAPPING_ALIASES: dict[str, Sequence[str]] = {
    "cluster": ("cluster_id", "id"),
    "node": ("best_node", "node_id", "mapped_node"),
    "score": ("best_score", "similarity", "confidence", "purity"),
}


@dataclass
class ClusterInfo:
    """One bottom-up cluster and what it maps to (the fields the report and links need)."""

    id: str
    label: str = ""
    size: int | None = None
    keywords: list[str] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)
    stability: float | None = None
    best_nodes: list[tuple[str, float | None]] = field(default_factory=list)
    outlier: bool = False
    fits: bool | None = None  # mapping's verdict: the best node's score clears the threshold
    method: str = ""  # how the mapping was scored (label_majority, similarity)

    @property
    def linked_nodes(self) -> list[tuple[str, float | None]]:
        """The node links to assert (all candidates unless the mapping said the cluster fits no node)."""
        return [] if self.fits is False else self.best_nodes


@dataclass
class ClusterView:
    """One clusters folder (curation's layout: assignments.parquet, clusters.json, stability.json,
    mapping.json, proposals.yaml), read lazily and tolerantly."""

    folder: Path

    def exists(self) -> bool:
        return self.folder.is_dir() and (self.assignments is not None or bool(self.clusters))

    @cached_property
    def assignments(self) -> pd.DataFrame | None:
        """One row per clustered text: `cluster` (str; "-1" = outliers), `x`, `y` (2-D map), `text`, ..."""
        path = _first_existing(self.folder, [f"assignments{sfx}" for sfx in TABLE_SUFFIXES])
        if path is None:
            return None
        df = rename_aliases(read_any_table(path), ASSIGNMENT_ALIASES)
        if "cluster" in df.columns:
            df["cluster"] = df["cluster"].astype(str)
        return df

    @cached_property
    def clusters(self) -> list[ClusterInfo]:
        """Every cluster with its label, size, keywords, examples, stability and best node(s) with scores."""
        info: dict[str, ClusterInfo] = {}
        path = _first_existing(self.folder, ["clusters.json"])
        if path is not None:
            for raw in _cluster_records(_read_json(path)):
                c = _cluster_from_record(raw)
                info[c.id] = c
        mapping = self.mapping
        if mapping is not None and {"cluster", "node"} <= set(mapping.columns):
            for cid, rows in mapping.groupby(mapping["cluster"].astype(str), sort=False):
                c = info.setdefault(cid, ClusterInfo(id=cid))
                if not c.best_nodes:
                    scores = rows["score"] if "score" in rows.columns else [None] * len(rows)
                    c.best_nodes = [(str(n), _float(s)) for n, s in zip(rows["node"], scores, strict=True)
                                    if isinstance(n, str) and n]
                if "fits" in rows.columns and c.fits is None:
                    c.fits = bool(rows["fits"].iloc[0])
                if "method" in rows.columns and not c.method:
                    c.method = str(rows["method"].iloc[0])
        if self.assignments is not None and "cluster" in self.assignments.columns:
            for cid, n in self.assignments["cluster"].value_counts().items():
                c = info.setdefault(str(cid), ClusterInfo(id=str(cid)))
                if c.size is None:
                    c.size = int(n)
        for c in info.values():
            c.outlier = c.outlier or c.id in ("-1", "outlier", "outliers", "noise")
        return sorted(info.values(), key=lambda c: (c.outlier, -(c.size or 0), c.id))

    @cached_property
    def mapping(self) -> pd.DataFrame | None:
        """cluster -> node with `score` (one row per (cluster, candidate node), best first), `fits`, `method`."""
        path = _first_existing(self.folder, [f"mapping{sfx}" for sfx in TABLE_SUFFIXES])
        if path is None:
            return None
        df = pd.DataFrame(_mapping_rows(_read_json(path))) if path.suffix == ".json" else read_any_table(path)
        df = rename_aliases(df, MAPPING_ALIASES)
        return df if not df.empty else None

    @cached_property
    def metrics(self) -> dict[str, Any]:
        """Scalar run numbers (n_clusters, outlier fraction, seed ARI, node ARI / NMI, ...), flattened."""
        out: dict[str, Any] = {}
        for name, keys in (("clusters.json", ("n_clusters", "outlier_fraction", "method", "reassigned_outliers",
                                               "stability")),
                           ("mapping.json", ("agreement", "min_score", "node_ari", "seed_ari")),
                           ("stability.json", ("seeds", "resamples")),
                           ("metrics.json", None)):
            path = self.folder / name
            data = _read_json(path) if path.is_file() else None
            if not isinstance(data, dict):
                continue
            for key, value in data.items():
                if keys is not None and key not in keys:
                    continue
                for flat_key, flat_value in _flat_scalars(value, key).items():
                    out.setdefault(flat_key, flat_value)
        return out

    @property
    def proposals_file(self) -> Path | None:
        return _first_existing(self.folder, ["proposals.yaml", "proposals/*.yaml", "*proposal*.yaml"])


@dataclass
class AtlasStore:
    """Read-only view of one atlas folder; every artefact is loaded on first access."""

    root: Path

    @classmethod
    def open(cls, out_dir: str | Path) -> AtlasStore:
        root = Path(out_dir)
        if not root.is_dir():
            raise AtlasError(f"{root}: no atlas folder here; {RUN_HINT}")
        return cls(root.resolve())

    # ------------------------------------------------------------------ run-level JSON
    @cached_property
    def manifest(self) -> dict[str, Any]:
        path = self.root / "manifest.json"
        return _read_json(path) if path.is_file() else {}

    @cached_property
    def metrics(self) -> dict[str, Any]:
        path = self.root / "metrics.json"
        return _read_json(path) if path.is_file() else {}

    @cached_property
    def stage_records(self) -> dict[str, dict[str, Any]]:
        """The pipeline's per-stage records (`.stages/<name>.json`: key, seconds, result), if any."""
        folder = self.root / ".stages"
        records: dict[str, dict[str, Any]] = {}
        if folder.is_dir():
            for path in sorted(folder.glob("*.json")):
                try:
                    data = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue  # a record being rewritten; the manifest has the final word
                if isinstance(data, dict):
                    records[path.stem] = data
        return records

    def require(self, what: str, ok: bool) -> None:
        """Raise the standard one-line error when a stage's output is missing."""
        if not ok:
            raise AtlasError(f"{self.root}: no {what} in this atlas; {RUN_HINT}")

    # ------------------------------------------------------------------ taxonomy and crosswalks
    @property
    def taxonomy_ttl(self) -> Path:
        return self.root / "taxonomy.ttl"

    @property
    def atlas_ttl(self) -> Path:
        return self.root / "atlas.ttl"

    @cached_property
    def taxonomy_graph(self):  # -> rdflib.Graph | None
        from refusal_atlas.ontology.io import parse_rdf

        for path in (self.taxonomy_ttl, self.atlas_ttl):
            if path.is_file():
                return parse_rdf(path)
        return None

    @cached_property
    def taxonomy(self):  # -> Taxonomy | None
        """The taxonomy the atlas was built from: taxonomy.ttl, else the folder named in the manifest."""
        graph = self.taxonomy_graph
        if graph is not None:
            from refusal_atlas.ontology.from_rdf import graph_to_taxonomy

            return graph_to_taxonomy(graph, source=str(self.taxonomy_ttl))
        source = (self.manifest.get("parameters") or {}).get("taxonomy")
        if source and Path(source).is_dir():
            from refusal_atlas.taxonomy.loader import load_taxonomy

            return load_taxonomy(Path(source))
        return None

    def node_label(self, node_id: str) -> str:
        tax = self.taxonomy
        if tax is not None and node_id in tax.nodes:
            return tax.nodes[node_id].label
        labels = (self.directions_meta.get("taxonomy") or {}).get("labels") or {}
        return str(labels.get(node_id, node_id))

    @cached_property
    def crosswalks(self) -> list[tuple[str, str, str, str]]:
        """(node id, SKOS predicate CURIE, external CURIE, external label), from the atlas's own RDF.

        The taxonomy export carries the crosswalk triples, so the atlas answers for the crosswalks
        it was built with; without them the shipped SSSOM files are used.
        """
        rows: list[tuple[str, str, str, str]] = []
        graph = self.taxonomy_graph
        if graph is not None:
            rows = _graph_crosswalks(graph)
        if not rows:
            from refusal_atlas.taxonomy.crosswalk import load_crosswalks

            rows = [(m.node_id, m.predicate_id, m.object_id, m.object_label) for m in load_crosswalks()]
        return rows

    # ------------------------------------------------------------------ prompts, corpus, organism
    def _parquet(self, name: str) -> pd.DataFrame | None:
        path = _table(self.root, [name])
        return read_any_table(path) if path is not None else None

    @cached_property
    def prompts(self) -> pd.DataFrame | None:
        return self._parquet("prompts")

    @cached_property
    def corpus(self) -> pd.DataFrame | None:
        return self._parquet("corpus")

    @property
    def organism_dir(self) -> Path:
        return self.root / "organism"

    @cached_property
    def organism(self) -> dict[str, Any] | None:
        """organism.json (settings, policy, metrics) or None when no organism was built."""
        path = self.organism_dir / "organism.json"
        return _read_json(path) if path.is_file() else None

    @cached_property
    def adherence(self) -> pd.DataFrame | None:
        """Held-out rows of the organism evaluation (prompt, response, category, refused, adherent)."""
        path = _table(self.organism_dir, ["adherence"])
        return read_any_table(path) if path is not None else None

    @cached_property
    def adherence_by_node(self) -> pd.DataFrame | None:
        """Per node x condition: n, refusal_rate, adherence (computed from `adherence` if not stored)."""
        path = _table(self.organism_dir, ["adherence_by_node"])
        if path is not None:
            return read_any_table(path)
        held = self.adherence
        if held is None or held.empty or not {"node", "refused"} <= set(held.columns):
            return None
        keys = [c for c in ("node", "condition", "expected", "category") if c in held.columns]
        agg = {"n": ("refused", "size"), "refusal_rate": ("refused", "mean")}
        if "adherent" in held.columns:
            agg["adherence"] = ("adherent", "mean")
        return held.groupby(keys, dropna=False).agg(**agg).reset_index()

    # ------------------------------------------------------------------ clusters
    @property
    def clusters_dir(self) -> Path:
        return self.root / "clusters"

    @cached_property
    def cluster_view(self) -> ClusterView:
        """The prompt clusters (clusters/): mapped to taxonomy nodes, with proposals."""
        return ClusterView(self.clusters_dir)

    @cached_property
    def response_cluster_view(self) -> ClusterView:
        """The refusal-wording clusters (clusters/responses/), when the run made them."""
        return ClusterView(self.clusters_dir / "responses")

    @property
    def cluster_assignments(self) -> pd.DataFrame | None:
        return self.cluster_view.assignments

    @property
    def clusters(self) -> list[ClusterInfo]:
        return self.cluster_view.clusters

    @property
    def cluster_mapping(self) -> pd.DataFrame | None:
        return self.cluster_view.mapping

    @property
    def cluster_metrics(self) -> dict[str, Any]:
        return self.cluster_view.metrics

    @property
    def proposals_file(self) -> Path | None:
        return self.cluster_view.proposals_file

    # ------------------------------------------------------------------ directions
    @property
    def directions_dir(self) -> Path:
        return self.root / "directions"

    def has_directions(self) -> bool:
        return (self.directions_dir / "directions.json").is_file()

    @cached_property
    def directions(self):  # -> DirectionSet | None
        if not self.has_directions():
            return None
        from refusal_atlas.mechinterp.directions import DirectionSet

        return DirectionSet.load(self.directions_dir)

    @cached_property
    def directions_meta(self) -> dict[str, Any]:
        path = self.directions_dir / "directions.json"
        return _read_json(path) if path.is_file() else {}

    @cached_property
    def direction_metrics(self) -> pd.DataFrame | None:
        """Per (node, layer, position) of diff_means: norm, noise_floor, reliability, auroc, selection scores."""
        ds = self.directions
        if ds is None:
            return None
        from refusal_atlas.lm.positions import position_label

        rows = []
        names = ds.nodes_with_pooled
        floor = ds.noise.get("diff_means/split_half_mean")
        p05 = ds.noise.get("diff_means/split_half_p05")
        rel = ds.noise.get("diff_means/reliability")
        auroc = ds.meta.get("auroc") or {}
        for i, node in enumerate(names):
            for k, pos in enumerate(ds.positions):
                key = f"diff_means/{node}/{position_label(pos)}"
                if key not in ds.tensors:
                    continue
                norms = ds.tensors[key].norm(dim=-1)
                node_auroc = (auroc.get(node) or {}).get(position_label(pos)) or []
                for j, layer in enumerate(ds.layers):
                    rows.append({
                        "node": node, "layer": int(layer), "position": position_label(pos),
                        "norm": float(norms[j]),
                        "noise_floor": _cell(floor, i, j, k), "split_half_p05": _cell(p05, i, j, k),
                        "reliability": _cell(rel, i, j, k),
                        "auroc": _float(node_auroc[j]) if j < len(node_auroc) else None,
                    })
        df = pd.DataFrame(rows)
        if df.empty:
            return None
        profiles = self.layer_profiles
        if profiles is not None and {"node", "layer"} <= set(profiles.columns):
            keys = ["node", "layer"] + (["position"] if "position" in profiles.columns else [])
            extra = [c for c in profiles.columns if c not in df.columns or c in keys]
            prof = profiles[extra].copy()
            if "position" in prof.columns:
                prof["position"] = prof["position"].astype(str)
            df = df.merge(prof.drop_duplicates(keys), on=keys, how="left")
        sel = self.selection
        if sel is not None and {"node", "layer", "position"} <= set(sel.columns):
            s = sel.copy()
            s["position"] = s["position"].astype(str)
            s["layer"] = s["layer"].astype(int)
            cols = [c for c in s.columns if c in ("node", "layer", "position", "bypass_score", "induce_score",
                                                   "kl_score", "selected")]
            df = df.merge(s[cols].drop_duplicates(["node", "layer", "position"]),
                          on=["node", "layer", "position"], how="left")
        return df

    @cached_property
    def probe_accuracy(self) -> pd.DataFrame | None:
        """Per layer and position: cross-validated accuracy of a linear probe for node identity, and chance."""
        ds = self.directions
        probe = (ds.meta.get("probe") or {}) if ds is not None else {}
        acc = probe.get("accuracy") or {}
        rows = [{"layer": int(layer), "position": str(pos), "probe_accuracy": _float(values[j]),
                 "chance": _float(probe.get("chance"))}
                for pos, values in acc.items() for j, layer in enumerate(ds.layers) if j < len(values)]
        return pd.DataFrame(rows) if rows else None

    def overlap_edges(self, kind: str = "overlap") -> list[tuple[str, str, dict[str, Any]]]:
        """Edges of the overlap graph of one kind ("overlap"; "taxonomy" for the parent links)."""
        g = self.overlap_graph
        if g is None:
            return []
        return [(str(a), str(b), dict(d)) for a, b, d in g.edges(data=True) if d.get("kind", "overlap") == kind]

    @cached_property
    def layer_profiles(self) -> pd.DataFrame | None:
        """Per node x layer (x position): auroc, probe accuracy, ... from the geometry stage, if written."""
        for root in (self.root / "overlap", self.directions_dir, self.root / "geometry"):
            path = _table(root, ["layer_profiles", "profiles", "*profile*"])
            if path is not None:
                return rename_aliases(read_any_table(path), {"node": ("node_id",), "auroc": ("AUROC",)})
        return None

    @cached_property
    def selection(self) -> pd.DataFrame | None:
        """Direction-selection scores per node x (layer, position): bypass, induce, KL, `selected`.

        Reads every `*select*` table in causal/ (or directions/): the one with `bypass_score` is the
        scores table; a table of chosen (node, layer, position) rows, if separate, marks `selected`.
        """
        found: list[Path] = []
        for root in (self.causal_dir, self.directions_dir):
            if root.is_dir():
                found += sorted(p for p in root.iterdir() if p.is_file() and "select" in p.name
                                and p.suffix in TABLE_SUFFIXES and not p.name.startswith("."))
        scores, chosen = None, None
        aliases = {"bypass_score": ("bypass",), "induce_score": ("induce",), "kl_score": ("kl", "harmless_kl"),
                   "selected": ("chosen",)}
        for path in found:
            df = rename_aliases(read_any_table(path), aliases)
            if not {"node", "layer", "position"} <= set(df.columns):
                continue
            df["position"] = df["position"].astype(str)
            df["layer"] = df["layer"].astype(int)
            if "bypass_score" in df.columns and scores is None:
                scores = df
            elif "bypass_score" not in df.columns and chosen is None:
                chosen = df
        if scores is None:
            return None
        if "method" in scores.columns and (scores["method"] == "diff_means").any():
            scores = scores[scores["method"] == "diff_means"]
        if chosen is not None:
            keys = set(zip(chosen["node"], chosen["layer"], chosen["position"], strict=True))
            scores = scores.assign(selected=[k in keys for k in zip(scores["node"], scores["layer"],
                                                                    scores["position"], strict=True)])
        return scores.reset_index(drop=True)

    # ------------------------------------------------------------------ overlap graph
    @property
    def overlap_dir(self) -> Path:
        return self.root / "overlap"

    @cached_property
    def overlap_graph(self):  # -> networkx.Graph | None
        path = _first_existing(self.overlap_dir, ["overlap.graphml", "*.graphml"])
        if path is None:
            return None
        import networkx as nx

        try:
            return nx.read_graphml(path)
        except Exception as exc:  # networkx raises several types for malformed XML
            raise AtlasError(f"{path}: unreadable GraphML ({exc}); rerun `refusal-atlas directions overlap`") from exc

    @cached_property
    def overlap_json(self) -> dict[str, Any]:
        path = _first_existing(self.overlap_dir, ["overlap.json"])
        data = _read_json(path) if path is not None else {}
        return data if isinstance(data, dict) else {"data": data}

    # ------------------------------------------------------------------ causal tests
    @property
    def causal_dir(self) -> Path:
        return self.root / "causal"

    def _causal_table(self, stems: Sequence[str], aliases: dict[str, Sequence[str]]) -> pd.DataFrame | None:
        path = _table(self.causal_dir, stems)
        if path is None:
            return None
        df = rename_aliases(read_any_table(path), aliases)
        return df if not df.empty else None

    @cached_property
    def cross_ablation(self) -> pd.DataFrame | None:
        """Long table: `ablated` direction ("none" = baseline), `method`, `evaluated` node's prompts,
        `refusal_rate` (+ logit score, harmless KL).

        When the generated-refusal rate was not measured (all NaN), `refusal_rate` is the share of
        prompts whose first greedy token opens a refusal, and `refusal_measure` says which it is.
        """
        df = self._causal_table(["cross_ablation", "cross-ablation", "*cross*abl*"], CROSS_ABLATION_ALIASES)
        return _fill_rate(df, "refusal_rate") if df is not None else None

    @cached_property
    def steering(self) -> pd.DataFrame | None:
        """Long table: `node` direction added, `layer`, `induced_refusal_rate` (one coefficient: 1.0 if run)."""
        df = self._causal_table(["steering", "steer", "*steer*"], STEERING_ALIASES)
        if df is None:
            return None
        if "coeff" in df.columns and df["coeff"].nunique() > 1:
            coeffs = sorted(df["coeff"].dropna().unique())
            df = df[df["coeff"] == (1.0 if 1.0 in coeffs else coeffs[0])]
        return _fill_rate(df, "induced_refusal_rate")

    @cached_property
    def condition_table(self) -> pd.DataFrame | None:
        """Per node x condition value: refusal_rate with CI, projection on the node's direction."""
        return self._causal_table(["conditions", "condition_table", "*condition*"], CONDITION_ALIASES)

    @cached_property
    def wording(self) -> pd.DataFrame | None:
        """Wording vs detection: logit-lens tokens per direction and/or probe accuracy per layer."""
        return self._causal_table(["wording", "logit_lens", "*wording*", "*logit*"], {"node": ("direction",)})

    # ------------------------------------------------------------------ figures and status
    def figures(self) -> list[Path]:
        """PNG figures the stages wrote (embedded in the report as base64)."""
        found: list[Path] = []
        for sub in ("clusters", "overlap", "causal", "directions", "organism"):
            base = self.root / sub
            if base.is_dir():
                found.extend(sorted(p for p in base.rglob("*.png") if p.is_file()))
        return found

    def stages(self) -> dict[str, bool]:
        """Which stages left output here (the report's "not run" markers)."""
        return {
            "taxonomy": self.taxonomy_ttl.is_file(),
            "atlas": self.atlas_ttl.is_file(),
            "prompts": self.prompts is not None,
            "organism": self.organism is not None,
            "corpus": self.corpus is not None,
            "clusters": bool(self.clusters),
            "directions": self.has_directions(),
            "overlap": self.overlap_graph is not None,
            "cross_ablation": self.cross_ablation is not None,
            "steering": self.steering is not None,
            "conditions": self.condition_table is not None,
        }


# ---------------------------------------------------------------------------------- helpers
def model_identity(meta: dict[str, Any], manifest: dict[str, Any]) -> tuple[str, str | None]:
    """(model id, revision) from direction metadata (flat keys or a `model` provenance dict)."""
    prov = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    model = meta.get("model_id") or prov.get("model_id") or prov.get("model_spec")
    if not model and isinstance(meta.get("model"), str):
        model = meta["model"]
    model = model or manifest.get("model") or "unknown"
    revision = meta.get("model_revision") or prov.get("model_revision")
    return str(model), (str(revision) if revision else None)


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if np.isnan(out) else out


def _flat_scalars(value: Any, prefix: str) -> dict[str, Any]:
    """Nested dicts flattened to dotted keys, keeping only numbers, strings and booleans."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat_scalars(v, f"{prefix}.{k}"))
        return out
    if isinstance(value, int | float | str | bool) and not (isinstance(value, float) and np.isnan(value)):
        return {prefix: value}
    return {}


def _fill_rate(df: pd.DataFrame, column: str) -> pd.DataFrame:
    """Use the first-token refusal rate where the generated rate was not measured."""
    df = df.copy()
    measured = column in df.columns and df[column].notna().any()
    if not measured and "first_token_refusal_rate" in df.columns:
        df[column] = df["first_token_refusal_rate"]
        df["refusal_measure"] = "first-token refusal rate"
        if "first_token_refusal_rate_baseline" in df.columns:
            df["refusal_before"] = df["first_token_refusal_rate_baseline"]
    elif measured:
        df["refusal_measure"] = "generated refusal rate (marker detector)"
    return df


def _cell(t, i: int, j: int, k: int) -> float | None:
    if t is None:
        return None
    value = float(t[i, j, k])
    return None if np.isnan(value) else value


def _graph_crosswalks(graph) -> list[tuple[str, str, str, str]]:
    from rdflib import RDF, SKOS

    from refusal_atlas.ontology.namespaces import RA

    predicates = {SKOS.exactMatch: "skos:exactMatch", SKOS.closeMatch: "skos:closeMatch",
                  SKOS.broadMatch: "skos:broadMatch", SKOS.narrowMatch: "skos:narrowMatch",
                  SKOS.relatedMatch: "skos:relatedMatch"}
    rows = []
    for ext in set(graph.subjects(RDF.type, RA.ExternalCategory)):
        curie = graph.value(ext, SKOS.notation)
        if curie is None:
            continue
        label = graph.value(ext, SKOS.prefLabel)
        for predicate, name in predicates.items():
            for concept in graph.subjects(predicate, ext):
                node = graph.value(concept, SKOS.notation)
                if node is not None:
                    rows.append((str(node), name, str(curie), str(label or "")))
    return sorted(set(rows))


def _cluster_records(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, list):
        return [r for r in data if isinstance(r, dict)]
    if isinstance(data, dict):
        inner = data.get("clusters")
        if isinstance(inner, list):
            return [r for r in inner if isinstance(r, dict)]
        if isinstance(inner, dict):
            return [{"id": k, **v} for k, v in inner.items() if isinstance(v, dict)]
        if all(isinstance(v, dict) for v in data.values()):
            return [{"id": k, **v} for k, v in data.items()]
    return []


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return list(value)
    return list(value)


def _cluster_from_record(raw: dict[str, Any]) -> ClusterInfo:
    cid = str(raw.get("id", raw.get("cluster", raw.get("cluster_id", ""))))
    keywords = [str(k[0] if isinstance(k, list | tuple) else k) for k in
                _as_list(raw.get("keywords", raw.get("terms", raw.get("top_terms"))))]
    examples = []
    for ex in _as_list(raw.get("examples", raw.get("representatives", raw.get("representative_examples")))):
        if isinstance(ex, dict):
            ex = ex.get("text", ex.get("response", ex.get("prompt", "")))
        examples.append(str(ex))
    best: list[tuple[str, float | None]] = []
    for item in _as_list(raw.get("best_nodes", raw.get("nodes", raw.get("mapping")))):
        if isinstance(item, dict):
            node = item.get("node", item.get("id"))
            if node:
                best.append((str(node), _float(item.get("score"))))
        elif isinstance(item, list | tuple) and item:
            best.append((str(item[0]), _float(item[1]) if len(item) > 1 else None))
        elif isinstance(item, str):
            best.append((item, None))
    if not best and isinstance(raw.get("best_node"), str) and raw["best_node"]:
        best = [(raw["best_node"], _float(raw.get("score", raw.get("best_score"))))]
    size = raw.get("size", raw.get("n", raw.get("count")))
    stability = raw.get("stability", raw.get("jaccard"))
    if isinstance(stability, dict):
        stability = stability.get("seed_jaccard", stability.get("jaccard", stability.get("mean")))
    return ClusterInfo(
        id=cid, label=str(raw.get("label", raw.get("name", "")) or ""),
        size=int(size) if _float(size) is not None else None, keywords=keywords, examples=examples,
        stability=_float(stability), best_nodes=best, outlier=bool(raw.get("outlier", False)),
    )


def _mapping_rows(data: Any) -> list[dict[str, Any]]:
    """Flatten a mapping JSON ({cluster: [{node, score}...]}, {"mappings": [...]}, or a list)."""
    if isinstance(data, dict):
        for key in ("mappings", "mapping", "clusters", "rows"):
            if isinstance(data.get(key), list | dict):
                return _mapping_rows(data[key])
        rows = []
        for cid, value in data.items():
            for item in _as_list(value) if not isinstance(value, dict) else [value]:
                if isinstance(item, dict):
                    rows.append({"cluster": cid, **item})
                elif isinstance(item, list | tuple) and item:
                    rows.append({"cluster": cid, "node": item[0], "score": item[1] if len(item) > 1 else None})
        return rows
    if isinstance(data, list):
        rows = []
        for item in data:
            if not isinstance(item, dict):
                continue
            nested = item.get("matches", item.get("best_nodes", item.get("nodes")))
            cid = item.get("cluster", item.get("id", item.get("cluster_id")))
            extra = {k: item[k] for k in ("fits", "method", "size") if k in item}
            if isinstance(nested, list):
                for n in nested:
                    if isinstance(n, dict):
                        rows.append({"cluster": cid, **extra, **n})
                    elif isinstance(n, list | tuple) and n:
                        rows.append({"cluster": cid, **extra, "node": n[0], "score": n[1] if len(n) > 1 else None})
                if not nested:
                    rows.append({"cluster": cid, **extra, "node": None, "score": None})
            else:
                rows.append(item)
        return rows
    return []
