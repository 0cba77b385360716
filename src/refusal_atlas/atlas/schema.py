"""Every file of an atlas folder, declared once: its path, the stage that writes it, its columns.

The pipeline's stages write these paths and `AtlasStore` reads them; neither spells a file name of
its own. The causal tables' names and columns come from the causal protocol (`mechinterp.causal.files`),
which writes them. Where the store shows a table under other column names (the report's and the
queries' vocabulary), `view` is that one rename, written column → shown column.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from refusal_atlas.mechinterp.causal import files as causal_files
from refusal_atlas.mechinterp.causal.files import TableSpec

__all__ = [
    "ACTIVATIONS_DIR",
    "ADHERENCE",
    "ADHERENCE_BY_NODE",
    "ARTIFACTS",
    "ASSIGNMENTS",
    "ATLAS_TTL",
    "CAUSAL",
    "CAUSAL_DIR",
    "CLUSTERS_DIR",
    "CLUSTERS_JSON",
    "CORPUS",
    "COVERAGE_JSON",
    "DIRECTIONS_DIR",
    "DIRECTIONS_JSON",
    "DIRECTION_PROMPTS",
    "FINDINGS",
    "HARM_CAUSAL",
    "HARM_CELLS",
    "HARM_DIR",
    "HARM_FINDINGS",
    "HARM_GEOMETRY",
    "HARM_JSON",
    "HARM_PROJECTIONS",
    "HARM_PROJECTIONS_PNG",
    "MANIFEST",
    "MAPPING_JSON",
    "METRICS",
    "ORGANISM_DIR",
    "ORGANISM_JSON",
    "OVERLAP_DIR",
    "OVERLAP_GRAPHML",
    "OVERLAP_JSON",
    "PROMPTS",
    "PROPOSALS",
    "REPORT_HTML",
    "RESPONSES",
    "RESPONSE_CLUSTERS_DIR",
    "SAE_ARTIFACTS",
    "SAE_CLAMP",
    "SAE_DIR",
    "SAE_FEATURES",
    "SAE_JACCARD",
    "SAE_JSON",
    "SAE_MODEL_DIR",
    "SAE_SHARED",
    "SAE_WEIGHTS",
    "STABILITY_JSON",
    "STAGES_DIR",
    "STAGE_OUTPUTS",
    "TAXONOMY_TTL",
    "TREE_DIR",
    "TREE_JSON",
    "Artifact",
    "causal",
]


@dataclass(frozen=True)
class Artifact:
    """One file (or folder) of an atlas: `path` relative to the atlas root, the `stage` that writes it, and for
    tables the written `columns` (None: the writer's own format, see its module) and the store's `view`."""

    path: str
    stage: str
    columns: tuple[str, ...] | None = None
    view: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


TAXONOMY_TTL = Artifact("taxonomy.ttl", "ontology")
PROMPTS = Artifact("prompts.parquet", "prompts")
ORGANISM_DIR = "organism"
ORGANISM_JSON = Artifact(f"{ORGANISM_DIR}/organism.json", "organism")
ADHERENCE = Artifact(f"{ORGANISM_DIR}/adherence.parquet", "organism")
ADHERENCE_BY_NODE = Artifact(f"{ORGANISM_DIR}/adherence_by_node.csv", "organism")
RESPONSES = Artifact("responses.parquet", "collect")  # collect's resumable output; corpus.parquet adds refusals
CORPUS = Artifact("corpus.parquet", "detect")
CLUSTERS_DIR = "clusters"
RESPONSE_CLUSTERS_DIR = f"{CLUSTERS_DIR}/responses"
# inside each clusters folder (curation.cluster_store's layout)
ASSIGNMENTS = Artifact("assignments.parquet", "cluster")
CLUSTERS_JSON = Artifact("clusters.json", "cluster")
STABILITY_JSON = Artifact("stability.json", "cluster")
MAPPING_JSON = Artifact("mapping.json", "cluster")
PROPOSALS = Artifact("proposals.yaml", "cluster")
# the organism's replies to its own training refusals, where its wordings were planted (atlas/wording_stage.py)
WORDING_DIR = "wording"
WORDING_RESPONSES = Artifact(f"{WORDING_DIR}/responses.parquet", "wording")
WORDING_REFUSED = f"{WORDING_DIR}/refused.parquet"  # the refused replies, the clustering's input (as clusters/'s)
WORDING_CLUSTERS_DIR = f"{WORDING_DIR}/clusters"
DIRECTIONS_DIR = "directions"
ACTIVATIONS_DIR = "activations"  # one capture folder per (model, direction prompts); the directions record names it
DIRECTIONS_JSON = Artifact(f"{DIRECTIONS_DIR}/directions.json", "directions")
TREE_DIR = f"{DIRECTIONS_DIR}/tree"  # every node with enough prompts, at every depth (atlas/tree_stage.py)
TREE_JSON = Artifact(f"{TREE_DIR}/directions.json", "tree")
COVERAGE_JSON = Artifact(f"{DIRECTIONS_DIR}/coverage.json", "tree")
DIRECTION_PROMPTS = Artifact(f"{DIRECTIONS_DIR}/{causal_files.DIRECTION_PROMPTS.name}", "directions",
                             causal_files.DIRECTION_PROMPTS.columns)
OVERLAP_DIR = "overlap"
OVERLAP_GRAPHML = Artifact(f"{OVERLAP_DIR}/overlap.graphml", "overlap")
OVERLAP_JSON = Artifact(f"{OVERLAP_DIR}/overlap.json", "overlap")
CAUSAL_DIR = "causal"
ATLAS_TTL = Artifact("atlas.ttl", "atlas")
REPORT_HTML = Artifact("report.html", "atlas")
METRICS = Artifact("metrics.json", "atlas")
MANIFEST = Artifact("manifest.json", "run")
FINDINGS = Artifact("findings.json", "verdicts")
HARM_DIR = "harm"
HARM_CELLS = Artifact(f"{HARM_DIR}/cells.csv", "harm")
HARM_GEOMETRY = Artifact(f"{HARM_DIR}/geometry.csv", "harm")
HARM_PROJECTIONS = Artifact(f"{HARM_DIR}/projections.csv", "harm")
HARM_PROJECTIONS_PNG = Artifact(f"{HARM_DIR}/projections.png", "harm")
HARM_CAUSAL = Artifact(f"{HARM_DIR}/causal.csv", "harm")
HARM_FINDINGS = Artifact(f"{HARM_DIR}/findings.json", "harm")
HARM_JSON = Artifact(f"{HARM_DIR}/harm.json", "harm")
SAE_DIR = "sae"
SAE_MODEL_DIR = f"{SAE_DIR}/model"  # SAELens format: cfg.json + sae_weights.safetensors (+ training.json)
SAE_WEIGHTS = Artifact(f"{SAE_MODEL_DIR}/sae_weights.safetensors", "sae")
SAE_JSON = Artifact(f"{SAE_DIR}/sae.json", "sae")  # the stage's figures, its settings and the weights' sha256
SAE_FEATURES = Artifact(f"{SAE_DIR}/features.parquet", "sae", (
    "node", "rank", "feature", "decoder_cosine", "attribution", "attribution_se", "mean_act_node",
    "mean_act_harmless", "top_contexts", "promoted_tokens"))
SAE_CLAMP = Artifact(f"{SAE_DIR}/clamp.parquet", "sae", (
    "source", "target", "method", "own", "logodds_before", "logodds_after", "refusal_before", "refusal_after", "n",
    "harmless_kl", "n_harmless", "n_features", "factor"))
SAE_JACCARD = Artifact(f"{SAE_DIR}/jaccard.parquet", "sae", (
    "node_a", "node_b", "jaccard", "ci_low", "ci_high", "self_a_low", "self_b_low", "chance_95", "distinct",
    "overlapping", "shared", "n_boot"))
SAE_SHARED = Artifact(f"{SAE_DIR}/shared.parquet", "sae", ("feature", "n_nodes", "nodes", "shared"))
SAE_ARTIFACTS = (SAE_WEIGHTS, SAE_JSON, SAE_FEATURES, SAE_CLAMP, SAE_JACCARD, SAE_SHARED)
STAGES_DIR = ".stages"  # one record per stage: {key, seconds, result}

# The store's names for columns of the causal tables (what the report and the queries read).
_VIEWS: dict[str, dict[str, str]] = {
    causal_files.CROSS_ABLATION.name: {"source": "ablated", "target": "evaluated", "logit_score": "refusal_score",
                                       "refusal_rate_baseline": "refusal_before"},
    causal_files.COMPONENTS.name: {"source": "ablated", "target": "evaluated", "logit_score": "refusal_score",
                                   "refusal_rate_baseline": "refusal_before"},
    causal_files.CONDITIONS.name: {"refusal_ci_low": "ci_low", "refusal_ci_high": "ci_high"},
    causal_files.SELECTION.name: {"kl": "kl_score", "chosen": "selected"},
}


def causal(spec: TableSpec | str) -> Artifact:
    """The atlas artifact of one of the causal protocol's files (under `causal/`)."""
    name = spec.name if isinstance(spec, TableSpec) else spec
    columns = spec.columns if isinstance(spec, TableSpec) else None
    return Artifact(f"{CAUSAL_DIR}/{name}", "causal", columns, _VIEWS.get(name, {}))


CAUSAL: dict[str, Artifact] = {
    a.name: a for a in [*(causal(t) for t in (*causal_files.TABLES, *causal_files.SCANS)),
                        *(causal(n) for n in causal_files.JSON_FILES),
                        causal(causal_files.CROSS_ABLATION_FIGURE), causal(causal_files.STEERING_FIGURE),
                        causal(causal_files.SKIPPED)]}

ARTIFACTS: tuple[Artifact, ...] = (
    TAXONOMY_TTL, PROMPTS, ORGANISM_JSON, ADHERENCE, ADHERENCE_BY_NODE, RESPONSES, CORPUS,
    *(Artifact(f"{CLUSTERS_DIR}/{a.path}", a.stage) for a in (ASSIGNMENTS, CLUSTERS_JSON, STABILITY_JSON,
                                                             MAPPING_JSON, PROPOSALS)),
    WORDING_RESPONSES,
    DIRECTIONS_JSON, DIRECTION_PROMPTS, TREE_JSON, COVERAGE_JSON,
    OVERLAP_GRAPHML, OVERLAP_JSON, *CAUSAL.values(), ATLAS_TTL, REPORT_HTML,
    METRICS, MANIFEST, FINDINGS, HARM_CELLS, HARM_GEOMETRY, HARM_PROJECTIONS, HARM_PROJECTIONS_PNG, HARM_CAUSAL,
    HARM_FINDINGS, HARM_JSON,
    *SAE_ARTIFACTS,
)

# What proves a stage finished (a resumed run skips a stage whose key matches and whose outputs exist).
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "taxonomy": (),
    "ontology": (TAXONOMY_TTL.path,),
    "prompts": (PROMPTS.path,),
    "organism": (ORGANISM_JSON.path,),
    "collect": (RESPONSES.path,),
    "detect": (CORPUS.path,),
    "cluster": (CLUSTERS_DIR,),
    "wording": (WORDING_RESPONSES.path,),
    "directions": (DIRECTIONS_JSON.path,),
    "tree": (COVERAGE_JSON.path,),
    "overlap": (OVERLAP_GRAPHML.path,),
    "causal": (CAUSAL_DIR,),
    "harm": (HARM_JSON.path,),
    "verdicts": (FINDINGS.path,),
    "sae": (SAE_JSON.path,),
    "atlas": (REPORT_HTML.path, ATLAS_TTL.path, METRICS.path),
}
