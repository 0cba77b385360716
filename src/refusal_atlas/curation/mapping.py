"""Cluster → taxonomy node links, each with a score and the method that produced it.

Two evidence sources, chosen per cluster:

* `label_majority` — when at least half of a cluster's rows carry node labels (`node` or
  `nodes` columns, from the prompt set's crosswalks), the score of a node is the share of the
  cluster's rows labelled with it. This is direct evidence, so it wins when available.
* `similarity` — otherwise, the cosine between the cluster centroid and a node's embedding (the
  mean of "label: definition" and each example, embedded with the run's embedder). With MiniLM,
  clusters of a node's own topic score 0.6–0.8 and unrelated ones (cooking, gardening against
  the default taxonomy) 0.2–0.35, hence the default threshold of 0.4. A centroid always lands
  near *some* node, so a similarity link also needs the cluster's own rows to point to that
  node's branch more than the corpus's rows do (`branch_support`): replies clustered by their
  wording over many requests are otherwise linked to whatever topic their mix averages to.

Also ARI / NMI between clusters and primary nodes on the rows that carry one (outliers counted
as one cluster), the number to watch when asking whether bottom-up clusters agree with the
top-down taxonomy. Clusters whose best score is below `min_score` fit no node; `proposals`
reviews them: a proposed node with its evidence, or the reason it is not a harm source.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from refusal_atlas.curation.cluster import OUTLIER
from refusal_atlas.curation.cluster_store import ClusterRun
from refusal_atlas.curation.embed import TextEmbedder, make_embedder
from refusal_atlas.taxonomy.model import Taxonomy

DEFAULT_MIN_SCORE = {"label_majority": 0.5, "similarity": 0.4}
# a similarity link also needs the cluster's rows to point to its branch (`branch_support`; docs/decisions.md)
FOCUS_SHARE = 0.5
FOCUS_P = 0.05


@dataclass
class ClusterLink:
    cluster: int
    size: int
    method: str
    matches: list[tuple[str, float]]  # best first
    fits: bool
    # similarity links: how far the cluster's own rows point to the best node's branch (`branch_support`)
    support: dict | None = None

    @property
    def best(self) -> tuple[str, float] | None:
        return self.matches[0] if self.matches else None

    @property
    def unfocused(self) -> bool:
        """The rows point to the best node's branch no more than the corpus's rows do (a wording or style
        cluster, not a topic)."""
        return self.support is not None and not self.support["focused"]

    def to_dict(self) -> dict:
        out = {"cluster": self.cluster, "size": self.size, "method": self.method, "fits": self.fits,
               "matches": [{"node": n, "score": round(float(s), 4)} for n, s in self.matches]}
        if self.support is not None:
            out["branch_support"] = self.support
        return out


@dataclass
class Mapping:
    links: list[ClusterLink]
    agreement: dict = field(default_factory=dict)
    min_score: dict = field(default_factory=dict)

    def unmatched(self) -> list[ClusterLink]:
        return [link for link in self.links if not link.fits]

    def to_dict(self) -> dict:
        return {"min_score": self.min_score, "agreement": self.agreement,
                "clusters": [link.to_dict() for link in self.links]}


def row_nodes(run: ClusterRun) -> list[list[str]]:
    """Node ids per row from `nodes` (list) or `node` (str); empty when the row has none."""
    df = run.assignments
    out: list[list[str]] = []
    for i in range(len(df)):
        ids: list[str] = []
        if "nodes" in df.columns:
            ids = [str(v) for v in df["nodes"].iloc[i] if str(v)]
        if not ids and "node" in df.columns and str(df["node"].iloc[i] or ""):
            ids = [str(df["node"].iloc[i])]
        out.append(ids)
    return out


def primary_nodes(run: ClusterRun) -> list[str]:
    """One node per row (`node`, else the first of `nodes`, else "")."""
    df = run.assignments
    prim = [str(v or "") for v in df["node"].tolist()] if "node" in df.columns else [""] * len(df)
    lists = row_nodes(run)
    return [p or (lists[i][0] if lists[i] else "") for i, p in enumerate(prim)]


def node_texts(taxonomy: Taxonomy) -> dict[str, list[str]]:
    """What describes each active node: "label: definition" and its examples."""
    return {n.id: [f"{n.label}: {n.definition}", *n.examples] for n in taxonomy.active()}


def node_vectors(taxonomy: Taxonomy, embedder: TextEmbedder) -> tuple[list[str], np.ndarray]:
    texts = node_texts(taxonomy)
    ids = list(texts)
    flat = [t for i in ids for t in texts[i]]
    vecs = embedder.encode(flat) if flat else np.zeros((0, 1), np.float32)
    out, pos = [], 0
    for i in ids:
        v = vecs[pos:pos + len(texts[i])].mean(0)
        pos += len(texts[i])
        out.append(v / (np.linalg.norm(v) or 1.0))
    return ids, (np.stack(out) if out else np.zeros((0, vecs.shape[1]), np.float32))


def agreement(run: ClusterRun) -> dict:
    """ARI / NMI between clusters and primary nodes, on rows with a node."""
    prim = np.asarray(primary_nodes(run))
    has = prim != ""
    if has.sum() < 2:
        return {"rows_with_node": int(has.sum())}
    labels = run.labels[has]
    return {"rows_with_node": int(has.sum()), "n_nodes": len(set(prim[has].tolist())),
            "ari": float(adjusted_rand_score(prim[has], labels)),
            "nmi": float(normalized_mutual_info_score(prim[has], labels)),
            "ari_clustered_only": float(adjusted_rand_score(prim[has][labels != OUTLIER],
                                                            labels[labels != OUTLIER]))
            if (labels != OUTLIER).sum() > 1 else None}


def description_vectors(run: ClusterRun, embedder: TextEmbedder | None = None) -> np.ndarray:
    """Row vectors of the texts the clusters are mapped and described by, in the node vectors' space.

    The stored embeddings where they are that (the clustered column, raw, with the run's embedder); else the
    `--label-by` texts (refusals named by their prompts) or the clustered text itself re-embedded: vectors
    made net of a column (`net_of`) no longer live in the space node texts are embedded in, and an embedder
    given for the node texts needs the rows in its own space. Kept on `run` for the later steps."""
    key = None if embedder is None else str(getattr(embedder, "key", id(embedder)))
    if run.description is not None and run.description_key == key:
        return run.description
    a = run.assignments
    if "label_text" not in a.columns and not run.meta.get("net_of") and embedder is None:
        run.description, run.description_key = run.embeddings, key
        return run.embeddings
    emb = embedder or make_embedder(run.meta.get("embedder", {}).get("model"))
    texts = (a["label_text"] if "label_text" in a.columns else a["text"]).astype(str).tolist()
    x = np.asarray(emb.encode(texts), dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    run.description, run.description_key = x / np.where(norms > 0, norms, 1.0), key
    return run.description


def branch_support(hits: np.ndarray, idx: np.ndarray, branch: str) -> dict:
    """Whether a cluster is about `branch`: the share of its rows whose own nearest node lies in it, against the
    share among all rows (one-sided binomial test). Focused when clearly more rows point there than in the
    corpus, or when the branch holds most of the corpus and the cluster no less (a corpus about one harm): a
    cluster grouped by something else (replies by wording, net of their prompts) has requests that spread over
    the taxonomy as the corpus's do, and its centroid's best node says nothing about it.

    `hits`: per row considered (all rows, or the labelled ones), whether it points to `branch`; `idx`: the
    cluster's rows among them."""
    hits = np.asarray(hits, dtype=bool)
    k, n = int(hits[idx].sum()), len(idx)
    base = float(hits.mean()) if len(hits) else 0.0
    p = float(binomtest(k, n, base, alternative="greater").pvalue) if 0 < base < 1 else (1.0 if k < n else 0.0)
    share = k / n if n else 0.0
    return {"branch": branch, "share": round(share, 4), "corpus_share": round(base, 4), "p": round(p, 6),
            "focused": bool(p < FOCUS_P or (base >= FOCUS_SHARE and share >= base)),
            "rule": f"one-sided binomial p < {FOCUS_P} against the corpus share, or corpus share >= {FOCUS_SHARE} "
                    "and the cluster's no lower"}


def nearest_branches(vectors: np.ndarray, vec_ids: list[str], node_vecs: np.ndarray, taxonomy: Taxonomy) -> np.ndarray:
    """Each row's nearest node's branch (ties by node id)."""
    order = np.argsort(np.asarray(vec_ids), kind="stable")
    sims = vectors @ node_vecs[order].T
    best = np.asarray(vec_ids)[order][sims.argmax(1)] if len(order) else np.asarray([""] * len(vectors))
    return np.asarray([taxonomy.branch_of(n) if n in taxonomy.nodes else n for n in best.tolist()], dtype=object)


def map_clusters(run: ClusterRun, taxonomy: Taxonomy, embedder: TextEmbedder | None = None, *, top: int = 3,
                 min_score: dict[str, float] | None = None) -> Mapping:
    """Best `top` nodes per cluster (see module docstring); `embedder` defaults to the run's own."""
    thresholds = {**DEFAULT_MIN_SCORE, **(min_score or {})}
    labels = run.labels
    nodes_per_row = row_nodes(run)
    known = set(taxonomy.nodes)
    vec_ids: list[str] = []
    vecs: np.ndarray | None = None
    row_branches: np.ndarray | None = None
    links = []
    for c in sorted(set(labels.tolist()) - {OUTLIER}):
        idx = np.flatnonzero(labels == c)
        labelled = [nodes_per_row[i] for i in idx if nodes_per_row[i]]
        if len(labelled) * 2 >= len(idx):
            counts = Counter(n for ids in labelled for n in set(ids) if n in known)
            matches = [(n, k / len(idx)) for n, k in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:top]
            method = "label_majority"
        else:
            if vecs is None:
                emb = embedder or make_embedder(run.meta.get("embedder", {}).get("model"))
                vec_ids, vecs = node_vectors(taxonomy, emb)
            centroid = description_vectors(run, embedder)[idx].mean(0)
            centroid /= np.linalg.norm(centroid) or 1.0
            sims = vecs @ centroid if len(vecs) else np.zeros(0)
            order: list[int] = np.lexsort((np.asarray(vec_ids), -sims))[:top].tolist() if len(sims) else []
            matches = [(vec_ids[j], float(sims[j])) for j in order]
            method = "similarity"
        fits = bool(matches) and matches[0][1] >= thresholds[method]
        support = None
        if method == "similarity" and matches and matches[0][0] in taxonomy.nodes and vecs is not None:
            if row_branches is None:
                row_branches = nearest_branches(description_vectors(run, embedder), vec_ids, vecs, taxonomy)
            branch = taxonomy.branch_of(matches[0][0])
            support = branch_support(row_branches == branch, idx, branch)
            fits = fits and support["focused"]
        elif method == "label_majority" and not fits and matches and matches[0][0] in taxonomy.nodes:
            # majority labels are direct evidence for a link; for a cluster they do not link, whether its rows
            # share a branch decides if it is one unlisted source of harm or a mix (e.g. one refusal wording)
            row_sets = [{taxonomy.branch_of(n) for n in ids if n in known} for ids in nodes_per_row]
            home = taxonomy.branch_of(matches[0][0])
            per_branch = Counter(b for i in idx for b in row_sets[i])
            branch = min(per_branch, key=lambda b: (-per_branch[b], b != home, b)) if per_branch else home
            labelled_rows = [i for i, ids in enumerate(nodes_per_row) if ids]
            position = {row: j for j, row in enumerate(labelled_rows)}
            hits = np.asarray([branch in row_sets[i] for i in labelled_rows], dtype=bool)
            support = branch_support(hits, np.asarray([position[int(i)] for i in idx if int(i) in position],
                                                      dtype=np.int64),
                                     branch)
        links.append(ClusterLink(c, len(idx), method, matches, fits, support))
    return Mapping(links, agreement(run), thresholds)
