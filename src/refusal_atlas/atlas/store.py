"""Typed, lazy, read-only access to an atlas output folder (what `refusal-atlas run` writes).

Every stage writes its own files (their paths and columns: `atlas.schema`); the store only reads
them, each on first use, and tolerates stages that have not run: the `has_*` checks and `None` /
empty results say so instead of raising, so the report and the queries can show "not run" for a
missing section. Only `AtlasStore.open` raises, when the folder itself is missing, with the
one-line advice to run `refusal-atlas run`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import networkx as nx
import pandas as pd
from rdflib import Graph

from refusal_atlas.atlas import schema
from refusal_atlas.atlas.store_clusters import ClusterInfo, ClusterView
from refusal_atlas.atlas.store_directions import BRANCH_SET, TREE_SET, direction_rows, merge_selection
from refusal_atlas.atlas.store_read import RUN_HINT, as_float, graph_crosswalks, read_json, read_table
from refusal_atlas.atlas.store_results import ResultsAccessors
from refusal_atlas.errors import AtlasError
from refusal_atlas.mechinterp.causal import files as causal_files
from refusal_atlas.mechinterp.causal.files import TableSpec
from refusal_atlas.mechinterp.directions import DirectionSet
from refusal_atlas.ontology.from_rdf import graph_to_taxonomy
from refusal_atlas.ontology.io import parse_rdf
from refusal_atlas.taxonomy.crosswalk import load_crosswalks
from refusal_atlas.taxonomy.loader import load_taxonomy
from refusal_atlas.taxonomy.model import Taxonomy

__all__ = ["RUN_HINT", "AtlasStore", "ClusterInfo", "ClusterView", "model_identity"]


@dataclass
class AtlasStore(ResultsAccessors):
    """Read-only view of one atlas folder; every artefact is loaded on first access."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)  # AtlasStore("atlas-out") works as well as AtlasStore(Path(...))

    @classmethod
    def open(cls, out_dir: str | Path) -> AtlasStore:
        root = Path(out_dir)
        if not root.is_dir():
            raise AtlasError(f"{root}: no atlas folder here; {RUN_HINT}")
        return cls(root.resolve())

    # ------------------------------------------------------------------ run-level JSON
    @cached_property
    def manifest(self) -> dict[str, Any]:
        return self._json(schema.MANIFEST) or {}

    @cached_property
    def metrics(self) -> dict[str, Any]:
        return self._json(schema.METRICS) or {}

    @cached_property
    def stage_records(self) -> dict[str, dict[str, Any]]:
        """The pipeline's per-stage records (`.stages/<name>.json`: key, seconds, result), if any."""
        folder = self.root / schema.STAGES_DIR
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
        return self.root / schema.TAXONOMY_TTL.path

    @property
    def atlas_ttl(self) -> Path:
        return self.root / schema.ATLAS_TTL.path

    @property
    def report_html(self) -> Path | None:
        """The HTML report, once the atlas stage wrote it."""
        path = self.root / schema.REPORT_HTML.path
        return path if path.is_file() else None

    @cached_property
    def taxonomy_graph(self) -> Graph | None:
        for path in (self.taxonomy_ttl, self.atlas_ttl):
            if path.is_file():
                return parse_rdf(path)
        return None

    @cached_property
    def taxonomy(self) -> Taxonomy | None:
        """The taxonomy the atlas was built from: taxonomy.ttl, else the folder named in the manifest."""
        graph = self.taxonomy_graph
        if graph is not None:
            return graph_to_taxonomy(graph, source=str(self.taxonomy_ttl))
        source = (self.manifest.get("parameters") or {}).get("taxonomy")
        if source and Path(source).is_dir():
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
            rows = graph_crosswalks(graph)
        if not rows:
            rows = [(m.node_id, m.predicate_id, m.object_id, m.object_label) for m in load_crosswalks()]
        return rows

    # ------------------------------------------------------------------ prompts, corpus, organism
    def _json(self, artifact: schema.Artifact) -> Any:
        path = self.root / artifact.path
        return read_json(path) if path.is_file() else None

    def table(self, artifact: schema.Artifact) -> pd.DataFrame | None:
        """Any table of the schema, under the store's column names (`artifact.view`); None when not written."""
        return read_table(self.root / artifact.path, artifact.view)

    def _causal(self, spec: TableSpec) -> pd.DataFrame | None:
        df = self.table(schema.causal(spec))
        return df if df is not None and not df.empty else None

    @cached_property
    def prompts(self) -> pd.DataFrame | None:
        return self.table(schema.PROMPTS)

    @cached_property
    def responses(self) -> pd.DataFrame | None:
        """What the collect stage generated (the corpus before the refusal detector)."""
        return self.table(schema.RESPONSES)

    @cached_property
    def corpus(self) -> pd.DataFrame | None:
        return self.table(schema.CORPUS)

    @property
    def organism_dir(self) -> Path:
        return self.root / schema.ORGANISM_DIR

    @cached_property
    def organism(self) -> dict[str, Any] | None:
        """organism.json (settings, policy, metrics) or None when no organism was built."""
        return self._json(schema.ORGANISM_JSON)

    @cached_property
    def adherence(self) -> pd.DataFrame | None:
        """Held-out rows of the organism evaluation (prompt, response, category, refused, adherent)."""
        return self.table(schema.ADHERENCE)

    @cached_property
    def adherence_by_node(self) -> pd.DataFrame | None:
        """Per node x condition: n, refusal_rate, adherence (computed from `adherence` if not stored)."""
        stored = self.table(schema.ADHERENCE_BY_NODE)
        if stored is not None:
            return stored
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
        return self.root / schema.CLUSTERS_DIR

    @cached_property
    def cluster_view(self) -> ClusterView:
        """The prompt clusters (clusters/): mapped to taxonomy nodes, with proposals."""
        return ClusterView(self.clusters_dir)

    @cached_property
    def response_cluster_view(self) -> ClusterView:
        """The refusal-wording clusters (clusters/responses/), when the run made them."""
        return ClusterView(self.root / schema.RESPONSE_CLUSTERS_DIR)

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
        return self.root / schema.DIRECTIONS_DIR

    def has_directions(self) -> bool:
        return (self.root / schema.DIRECTIONS_JSON.path).is_file()

    @cached_property
    def directions(self) -> DirectionSet | None:
        return DirectionSet.load(self.directions_dir) if self.has_directions() else None

    @cached_property
    def directions_meta(self) -> dict[str, Any]:
        return self._json(schema.DIRECTIONS_JSON) or {}

    @cached_property
    def direction_prompts(self) -> pd.DataFrame | None:
        """The prompts the directions were computed from: group (`analysis_node`), `harmful`, request form."""
        return self.table(schema.DIRECTION_PROMPTS)

    @cached_property
    def tree_directions(self) -> DirectionSet | None:
        """directions/tree/: every other node with enough prompts, at every depth (diff_means, floors)."""
        return DirectionSet.load(self.root / schema.TREE_DIR) if (self.root / schema.TREE_JSON.path).is_file() \
            else None

    @cached_property
    def coverage(self) -> list[dict[str, Any]]:
        """directions/coverage.json: per taxonomy node, its prompt counts, whether it was analysed, why not."""
        data = self._json(schema.COVERAGE_JSON)
        return [r for r in data.get("nodes", []) if isinstance(r, dict)] if isinstance(data, dict) else []

    def direction_set_of(self, node: str) -> DirectionSet | None:
        """The direction set holding `node`'s direction: the branch set first, else the tree set."""
        for ds in (self.directions, self.tree_directions):
            if ds is not None and node in ds.nodes_with_pooled:
                return ds
        return None

    @property
    def analysed_nodes(self) -> list[str]:
        """Every node with a direction: the branch set's, then the tree set's others."""
        out = list(self.directions.nodes) if self.directions is not None else []
        tree = self.tree_directions
        return out + ([n for n in tree.nodes if n not in out] if tree is not None else [])

    @cached_property
    def direction_metrics(self) -> pd.DataFrame | None:
        """Per (node, layer, position) of diff_means: norm, noise_floor, reliability, auroc, the `set` it comes
        from (branches / tree) and, for causal candidates, the selection scores."""
        ds = self.directions
        if ds is None:
            return None
        rows = direction_rows(ds, BRANCH_SET)
        if self.tree_directions is not None:
            rows += direction_rows(self.tree_directions, TREE_SET, skip={*ds.nodes_with_pooled})
        df = pd.DataFrame(rows)
        return None if df.empty else merge_selection(df, self.selection)

    @cached_property
    def probe_accuracy(self) -> pd.DataFrame | None:
        """Per layer and position: cross-validated accuracy of a linear probe for node identity, and chance."""
        ds = self.directions
        if ds is None:
            return None
        probe = ds.meta.get("probe") or {}
        acc = probe.get("accuracy") or {}
        rows = [{"layer": int(layer), "position": str(pos), "probe_accuracy": as_float(values[j]),
                 "chance": as_float(probe.get("chance"))}
                for pos, values in acc.items() for j, layer in enumerate(ds.layers) if j < len(values)]
        return pd.DataFrame(rows) if rows else None

    def overlap_edges(self, kind: str = "overlap") -> list[tuple[str, str, dict[str, Any]]]:
        """Edges of the overlap graph of one kind ("overlap"; "taxonomy" for the parent links)."""
        g = self.overlap_graph
        if g is None:
            return []
        return [(str(a), str(b), dict(d)) for a, b, d in g.edges(data=True) if d.get("kind", "overlap") == kind]

    @cached_property
    def selection(self) -> pd.DataFrame | None:
        """Direction-selection scores per candidate (node, layer, position, ablation scope) of the diff-means
        directions: `bypass_score`, `induce_score`, `kl_score`, `selected` (the choice), `tier`."""
        df = self._causal(causal_files.SELECTION)
        if df is None:
            return None
        df = df[df["method"] == "diff_means"].reset_index(drop=True)
        return df.assign(position=df["position"].astype(str), layer=df["layer"].astype(int))

    @cached_property
    def selection_record(self) -> dict[str, Any] | None:
        """The pooled direction's choice (selection.json): layer, position, ablate_from, steering_coefficient."""
        return self._json(schema.CAUSAL[causal_files.SELECTION_JSON])

    # ------------------------------------------------------------------ overlap graph
    @property
    def overlap_dir(self) -> Path:
        return self.root / "overlap"

    @cached_property
    def overlap_graph(self) -> nx.Graph | None:
        path = self.root / schema.OVERLAP_GRAPHML.path
        if not path.is_file():
            return None
        try:
            return nx.read_graphml(path)
        except Exception as exc:  # networkx raises several types for malformed XML
            raise AtlasError(f"{path}: unreadable GraphML ({exc}); rerun `refusal-atlas directions overlap`") from exc

    @cached_property
    def overlap_json(self) -> dict[str, Any]:
        data = self._json(schema.OVERLAP_JSON)
        return data if isinstance(data, dict) else {}

    # ------------------------------------------------------------------ causal tests
    @property
    def causal_dir(self) -> Path:
        return self.root / "causal"

    @cached_property
    def cross_ablation(self) -> pd.DataFrame | None:
        """Long table: `ablated` direction ("none" = baseline), `method`, `evaluated` node's prompts,
        `refusal_rate`, `refusal_before` (+ `refusal_score`, the logit score, and the harmless KL).

        When the generated-refusal rate was not measured (all NaN), `refusal_rate` is the share of
        prompts whose first greedy token opens a refusal, and `refusal_measure` says which it is.
        """
        df = self._causal(causal_files.CROSS_ABLATION)
        return _fill_rate(df, "refusal_rate") if df is not None else None

    @cached_property
    def cross_ablation_summary(self) -> pd.DataFrame | None:
        """Per ablated direction: refusal left on its own node's prompts vs the others'."""
        return self._causal(causal_files.CROSS_ABLATION_SUMMARY)

    @cached_property
    def bands(self) -> pd.DataFrame | None:
        """Per node and window of blocks whose writes lost the node's late direction: refusal vs its baseline."""
        return self._causal(causal_files.BANDS)

    @cached_property
    def components(self) -> pd.DataFrame | None:
        """The cross-ablation's table with each node's direction at the late scan layer (shared-vs-separable)."""
        return self._causal(causal_files.COMPONENTS)

    @cached_property
    def restoration(self) -> pd.DataFrame | None:
        """Per node and window of blocks set back to the `reference` model's weights: refusal vs its baseline."""
        return self._causal(causal_files.RESTORATION)

    @cached_property
    def steering(self) -> pd.DataFrame | None:
        """Long table: `node` direction added, `layer`, `induced_refusal_rate` (one coefficient: 1.0 if run)."""
        df = self._causal(causal_files.STEERING)
        if df is None:
            return None
        if df["coeff"].nunique() > 1:
            coeffs = sorted(df["coeff"].dropna().unique())
            df = df[df["coeff"] == (1.0 if 1.0 in coeffs else coeffs[0])]
        return _fill_rate(df, "induced_refusal_rate")

    @cached_property
    def steering_dose(self) -> pd.DataFrame | None:
        """The activation-addition coefficients tried on validation prompts, `chosen` the dose."""
        return self._causal(causal_files.STEERING_DOSE)

    @cached_property
    def pooled(self) -> dict[str, Any] | None:
        """The headline (pooled.json): refusal before / after the pooled ablation, harmless KL, induced refusal."""
        return self._json(schema.CAUSAL[causal_files.POOLED_JSON])

    @cached_property
    def refusal_tokens(self) -> dict[str, Any] | None:
        """The refusal-opening tokens the causal scores count (refusal_tokens.json)."""
        return self._json(schema.CAUSAL[causal_files.REFUSAL_TOKENS])

    @cached_property
    def causal_skipped(self) -> str | None:
        """Why the causal tests did not run (the model never refused), or None."""
        data = self._json(schema.CAUSAL[causal_files.SKIPPED])
        return str(data["reason"]) if data else None

    @cached_property
    def ablation_stability(self) -> pd.DataFrame | None:
        """First-token refusal under the pooled ablation per bootstrap resample of the direction prompts."""
        return self._causal(causal_files.ABLATION_STABILITY)

    @cached_property
    def cone_ablation(self) -> pd.DataFrame | None:
        """Refusal and KL with the pooled direction plus 0, 1, 2 residual axes ablated (`loading:<node>`)."""
        return self._causal(causal_files.CONE_ABLATION)

    @cached_property
    def condition_table(self) -> pd.DataFrame | None:
        """Per node x condition: refusal_rate with CI (`ci_low`, `ci_high`), projection on the node's direction."""
        return self._causal(causal_files.CONDITIONS)

    @cached_property
    def conditions_summary(self) -> pd.DataFrame | None:
        """Per condition category: mean projection and refusal deltas with CIs."""
        return self._causal(causal_files.CONDITIONS_SUMMARY)

    @cached_property
    def wording(self) -> pd.DataFrame | None:
        """Wording vs detection per layer: probe accuracy beside refusal-token promotion."""
        return self._causal(causal_files.WORDING)

    @cached_property
    def logit_lens_tokens(self) -> pd.DataFrame | None:
        """The tokens each direction promotes most through the logit lens, per layer."""
        return self._causal(causal_files.LOGIT_LENS_TOKENS)

    @cached_property
    def logit_lens_scores(self) -> pd.DataFrame | None:
        """Per direction and layer: how strongly it promotes the refusal tokens (z-score)."""
        return self._causal(causal_files.LOGIT_LENS_SCORES)

    # ------------------------------------------------------------------ figures and status
    def figures(self) -> list[Path]:
        """PNG figures the stages wrote (embedded in the report as base64)."""
        found: list[Path] = []
        for sub in (schema.CLUSTERS_DIR, schema.OVERLAP_DIR, schema.CAUSAL_DIR, schema.DIRECTIONS_DIR,
                    schema.ORGANISM_DIR):
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
    prov: dict[str, Any] = meta["model"] if isinstance(meta.get("model"), dict) else {}
    model = meta.get("model_id") or prov.get("model_id") or prov.get("model_spec")
    if not model and isinstance(meta.get("model"), str):
        model = meta["model"]
    model = model or manifest.get("model") or "unknown"
    revision = meta.get("model_revision") or prov.get("model_revision")
    return str(model), (str(revision) if revision else None)


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
