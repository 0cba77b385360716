"""Clusters that fit no taxonomy node become proposed nodes, in the taxonomy's own YAML format.

The file has a top-level `nodes:` list like every taxonomy file, each node with
`status: proposed` and a provenance naming the clustering run, so it can be copied into a
taxonomy folder and reviewed with `refusal-atlas taxonomy accept ID`. The label comes from the
cluster's c-TF-IDF keywords and the definition is a template the curator must rewrite; the
examples are the cluster's representative texts.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

from ruamel.yaml import YAML

from refusal_atlas.curation.cluster_store import ClusterRun
from refusal_atlas.curation.mapping import Mapping
from refusal_atlas.io import atomic_write_text
from refusal_atlas.taxonomy.model import Behaviour, Node, Status, Taxonomy

EXAMPLE_CHARS = 300


def _slug(words: list[str]) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", "_".join(words[:3]).lower()).strip("_")
    return slug[:40] or "cluster"


def _expectation(run: ClusterRun, cluster: int) -> Behaviour:
    """Observed behaviour: refuse when most rows were refused (or harmful), else comply."""
    df = run.assignments[run.assignments["cluster"] == cluster]
    for col in ("refused", "harmful"):
        if col in df.columns and len(df):
            return Behaviour.REFUSE if df[col].astype(bool).mean() >= 0.5 else Behaviour.COMPLY
    return Behaviour.REFUSE


def propose_nodes(run: ClusterRun, mapping: Mapping, taxonomy: Taxonomy | None = None) -> list[Node]:
    """One proposed node per cluster that fits no existing node."""
    summaries = {c["id"]: c for c in run.meta.get("clusters", [])}
    taken = set(taxonomy.nodes) if taxonomy is not None else set()
    out: list[Node] = []
    for link in mapping.unmatched():
        info = summaries.get(link.cluster, {})
        keywords = list(info.get("keywords", []))
        node_id = f"proposed_{_slug(keywords)}_{run.run_id[:6]}_{link.cluster}"
        while node_id in taken:
            node_id += "_x"
        taken.add(node_id)
        label = " / ".join(keywords[:3]).capitalize() or f"Cluster {link.cluster}"
        best = f"; closest existing node {link.best[0]} ({link.method} {link.best[1]:.2f})" if link.best else ""
        examples = []
        for rep in info.get("representatives", []):
            text = " ".join(str(rep["text"]).split())
            examples.append(text if len(text) <= EXAMPLE_CHARS else text[: EXAMPLE_CHARS - 1] + "…")
        out.append(Node(
            id=node_id,
            label=label,
            definition=("Proposed from a cluster of "
                        f"{link.size} {run.meta.get('input', {}).get('text_column', 'text')} texts characterised by: "
                        f"{', '.join(keywords[:8]) or 'no distinctive keywords'}. Rewrite this definition to "
                        "name the source of harm before accepting."),
            expect=_expectation(run, link.cluster),
            examples=examples,
            status=Status.PROPOSED,
            provenance=(f"refusal-atlas curate cluster run {run.run_id} on {run.meta.get('input', {}).get('path')} "
                        f"(sha256 {str(run.meta.get('input', {}).get('sha256', ''))[:12]}), cluster {link.cluster}"
                        f"{best}"),
        ))
    return out


def proposals_yaml(nodes: list[Node], run: ClusterRun) -> str:
    yaml = YAML()
    yaml.default_flow_style = False
    yaml.width = 100
    buf = io.StringIO()
    buf.write(f"# Proposed nodes from clustering run {run.run_id} ({run.folder}).\n"
              "# Copy this file into a taxonomy folder, rewrite each definition, then\n"
              "# `refusal-atlas taxonomy accept ID` the ones worth keeping.\n")
    yaml.dump({"nodes": [n.to_yaml_dict() for n in nodes]}, buf)
    return buf.getvalue()


def write_proposals(path: Path, nodes: list[Node], run: ClusterRun) -> Path:
    return atomic_write_text(path, proposals_yaml(nodes, run))
