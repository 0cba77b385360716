"""SAE features in atlas.ttl: each selected latent as a resource linked to the nodes that selected it.

- the SAE itself: `ra:SparseAutoencoder` with its model, layer, width, k, the weights file
  (`ra:artefactFile`) and that file's `ra:sha256`, so a feature id is only ever read against
  the exact weights it indexes;
- every latent some node selected: `ra:SaeFeature` (`ra:featureIndex`, `ra:ofSae`, the same
  `ra:sha256`, `ra:forNode` for each node that selected it);
- every (node, latent) selection: `ra:FeatureSelection` (`ra:forNode`, `ra:feature`, `ra:rank`,
  `ra:cosine` = the decoder row's cosine with the node's refusal direction, `ra:attribution`).

Every term comes from the closed `RA` namespace (defined in data/ontology/refusal-atlas.ttl), so a
misspelt term fails instead of minting an undefined IRI.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from rdflib import RDF, RDFS, XSD, Graph, Literal, URIRef
from rdflib.namespace import DCTERMS, PROV

from refusal_atlas.atlas import schema
from refusal_atlas.atlas.sae_read import sae_view
from refusal_atlas.atlas.store import AtlasStore
from refusal_atlas.hashing import file_sha256
from refusal_atlas.ontology import iris
from refusal_atlas.ontology.namespaces import RA
from refusal_atlas.ontology.results import number
from refusal_atlas.taxonomy.model import Taxonomy

__all__ = ["add_sae_features", "term"]

def term(name: str) -> URIRef:
    """`RA.<name>`; a name the vocabulary does not define fails (closed namespace)."""
    return URIRef(getattr(RA, name))


def _int(value: Any) -> Literal:
    return Literal(int(value), datatype=XSD.integer)


def add_sae_features(graph: Graph, store: AtlasStore, tax: Taxonomy, ns: str, base: str, atlas: URIRef) -> None:
    """Add the run's SAE and its selected features to `graph` (nothing when the sae stage has not run)."""
    view = sae_view(store)
    summary, features, weights = view.summary, view.features, view.weights
    if summary is None or features is None or weights is None or not len(features):
        return
    digest = file_sha256(weights)
    sae = URIRef(f"{base}sae")
    graph.add((sae, RDF.type, term("SparseAutoencoder")))
    graph.add((sae, PROV.wasGeneratedBy, atlas))
    graph.add((sae, RDFS.label, Literal(f"SAE at layer {summary.get('layer')} ({summary.get('width')} latents)")))
    graph.add((sae, term("artefactFile"), Literal(schema.SAE_WEIGHTS.path)))
    graph.add((sae, term("sha256"), Literal(digest)))
    if summary.get("model"):
        graph.add((sae, term("model"), Literal(str(summary["model"]))))
    for name, key in (("layer", "layer"), ("width", "width"), ("topK", "k"), ("tokenCount", "tokens")):
        if summary.get(key) is not None:
            graph.add((sae, term(name), _int(summary[key])))
    for name, key in (("fvu", "fvu"), ("meanL0", "l0"), ("deadFraction", "dead_fraction")):
        value = number(summary.get(key))
        if value is not None:
            graph.add((sae, term(name), value))
    feature_nodes: dict[int, list[str]] = {}
    for row in features.to_dict("records"):
        node = str(row["node"])
        if node not in tax.nodes:
            continue
        fid = int(row["feature"])
        feature_nodes.setdefault(fid, []).append(node)
        pick = URIRef(f"{base}sae/selection/{quote(node, safe='')}/{fid}")
        graph.add((pick, RDF.type, term("FeatureSelection")))
        graph.add((pick, PROV.wasGeneratedBy, atlas))
        graph.add((pick, term("forNode"), iris.node_iri(ns, node)))
        graph.add((pick, term("feature"), URIRef(f"{base}sae/feature/{fid}")))
        graph.add((pick, term("rank"), _int(row["rank"])))
        for name, key in (("cosine", "decoder_cosine"), ("attribution", "attribution")):
            value = number(row.get(key))
            if value is not None:
                graph.add((pick, term(name), value))
    for fid, nodes in sorted(feature_nodes.items()):
        feature = URIRef(f"{base}sae/feature/{fid}")
        graph.add((feature, RDF.type, term("SaeFeature")))
        graph.add((feature, PROV.wasGeneratedBy, atlas))
        graph.add((feature, RDFS.label, Literal(f"SAE feature {fid} (layer {summary.get('layer')})")))
        graph.add((feature, DCTERMS.identifier, Literal(str(fid))))
        graph.add((feature, term("featureIndex"), _int(fid)))
        graph.add((feature, term("ofSae"), sae))
        graph.add((feature, term("sha256"), Literal(digest)))
        for node in sorted(set(nodes)):
            graph.add((feature, term("forNode"), iris.node_iri(ns, node)))
