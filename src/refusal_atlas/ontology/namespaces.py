"""Closed Python namespaces for the vocabularies the ontology layer writes.

Every class here is an rdflib `DefinedNamespace` with `_fail = True`, so a misspelt term
(`AIRO.hasRiskSource`, `RA.expectedBehavior`) raises AttributeError at import or call time
instead of silently minting a wrong IRI. Only terms we actually use are listed; AIRO terms
were checked against AIRO 1.0 (a test re-checks them against the shipped copy).

This module deliberately does not use `from __future__ import annotations`: rdflib reads the
class annotations as real types.
"""

from rdflib import Namespace, URIRef
from rdflib.namespace import DefinedNamespace

RA_IRI = "https://w3id.org/refusal-atlas/vocab#"
CONDITION_IRI = "https://w3id.org/refusal-atlas/condition/"
DEFAULT_TAXONOMY_IRI = "https://w3id.org/refusal-atlas/taxonomy/"


class AIRO(DefinedNamespace):
    """AI Risk Ontology 1.0 (https://w3id.org/airo#): the terms refusal-atlas uses."""

    _NS = Namespace("https://w3id.org/airo#")
    _fail = True

    RiskSource: URIRef
    Hazard: URIRef
    Threat: URIRef
    Risk: URIRef
    Consequence: URIRef
    Impact: URIRef
    Purpose: URIRef
    AISubject: URIRef
    AIUser: URIRef
    AIModel: URIRef
    LocalityOfUse: URIRef
    Domain: URIRef
    RiskControl: URIRef
    Stakeholder: URIRef
    isRiskSourceFor: URIRef
    hasConsequence: URIRef
    hasImpact: URIRef
    hasImpactOnStakeholder: URIRef
    hasImpactOnArea: URIRef
    hasPurpose: URIRef
    hasModel: URIRef


class DPV(DefinedNamespace):
    """Data Privacy Vocabulary (https://w3id.org/dpv#): rules, contexts and the context values we reuse."""

    _NS = Namespace("https://w3id.org/dpv#")
    _fail = True

    Rule: URIRef
    Permission: URIRef
    Prohibition: URIRef
    Obligation: URIRef
    hasRule: URIRef
    hasContext: URIRef
    Context: URIRef
    Purpose: URIRef
    hasPurpose: URIRef
    hasJurisdiction: URIRef
    Child: URIRef
    Adult: URIRef
    VulnerableHuman: URIRef
    ScientificResearch: URIRef
    AcademicResearch: URIRef


class RISK(DefinedNamespace):
    """DPV risk extension (https://w3id.org/dpv/risk#)."""

    _NS = Namespace("https://w3id.org/dpv/risk#")
    _fail = True

    PotentialRiskSource: URIRef
    RiskSource: URIRef


_ISO_3166_ALPHA2 = (
    "AD", "AE", "AF", "AG", "AI", "AL", "AM", "AO", "AQ", "AR", "AS", "AT", "AU", "AW", "AX", "AZ",
    "BA", "BB", "BD", "BE", "BF", "BG", "BH", "BI", "BJ", "BL", "BM", "BN", "BO", "BQ", "BR", "BS",
    "BT", "BV", "BW", "BY", "BZ", "CA", "CC", "CD", "CF", "CG", "CH", "CI", "CK", "CL", "CM", "CN",
    "CO", "CR", "CU", "CV", "CW", "CX", "CY", "CZ", "DE", "DJ", "DK", "DM", "DO", "DZ", "EC", "EE",
    "EG", "EH", "ER", "ES", "ET", "FI", "FJ", "FK", "FM", "FO", "FR", "GA", "GB", "GD", "GE", "GF",
    "GG", "GH", "GI", "GL", "GM", "GN", "GP", "GQ", "GR", "GS", "GT", "GU", "GW", "GY", "HK", "HM",
    "HN", "HR", "HT", "HU", "ID", "IE", "IL", "IM", "IN", "IO", "IQ", "IR", "IS", "IT", "JE", "JM",
    "JO", "JP", "KE", "KG", "KH", "KI", "KM", "KN", "KP", "KR", "KW", "KY", "KZ", "LA", "LB", "LC",
    "LI", "LK", "LR", "LS", "LT", "LU", "LV", "LY", "MA", "MC", "MD", "ME", "MF", "MG", "MH", "MK",
    "ML", "MM", "MN", "MO", "MP", "MQ", "MR", "MS", "MT", "MU", "MV", "MW", "MX", "MY", "MZ", "NA",
    "NC", "NE", "NF", "NG", "NI", "NL", "NO", "NP", "NR", "NU", "NZ", "OM", "PA", "PE", "PF", "PG",
    "PH", "PK", "PL", "PM", "PN", "PR", "PS", "PT", "PW", "PY", "QA", "RE", "RO", "RS", "RU", "RW",
    "SA", "SB", "SC", "SD", "SE", "SG", "SH", "SI", "SJ", "SK", "SL", "SM", "SN", "SO", "SR", "SS",
    "ST", "SV", "SX", "SY", "SZ", "TC", "TD", "TF", "TG", "TH", "TJ", "TK", "TL", "TM", "TN", "TO",
    "TR", "TT", "TV", "TW", "TZ", "UA", "UG", "UM", "US", "UY", "UZ", "VA", "VC", "VE", "VG", "VI",
    "VN", "VU", "WF", "WS", "YE", "YT", "ZA", "ZM", "ZW", "EU",
)


class LOC(DefinedNamespace):
    """DPV locations (https://w3id.org/dpv/loc#): ISO 3166-1 alpha-2 country codes, plus EU."""

    _NS = Namespace("https://w3id.org/dpv/loc#")
    _fail = True
    _extras = list(_ISO_3166_ALPHA2)  # noqa: RUF012 (rdflib's DefinedNamespace API)


class RA(DefinedNamespace):
    """refusal-atlas's own vocabulary; every term is defined in data/ontology/refusal-atlas.ttl."""

    _NS = Namespace(RA_IRI)
    _fail = True

    # classes
    ConditionRule: URIRef
    Behaviour: URIRef
    Status: URIRef
    ConditionDimension: URIRef
    ContextValue: URIRef
    ExternalCategory: URIRef
    RefusalDirection: URIRef
    Cluster: URIRef
    # behaviour and status individuals
    Refuse: URIRef
    Redirect: URIRef
    ComplyWithCaveats: URIRef
    Comply: URIRef
    Proposed: URIRef
    Accepted: URIRef
    Deprecated: URIRef
    # taxonomy properties
    expectedBehaviour: URIRef
    restrictiveness: URIRef
    sourceKind: URIRef
    status: URIRef
    provenance: URIRef
    rationale: URIRef
    ruleIndex: URIRef
    dimension: URIRef
    broaderOrder: URIRef
    exampleOrder: URIRef
    # direction properties (mechinterp); vectors never go in RDF, only their file and hash
    forNode: URIRef
    model: URIRef
    modelRevision: URIRef
    layer: URIRef
    position: URIRef
    method: URIRef
    artefactFile: URIRef
    sha256: URIRef
    promptCount: URIRef
    noiseFloor: URIRef
    splitHalfCosine: URIRef
    auroc: URIRef
    bypassScore: URIRef
    induceScore: URIRef
    klDivergence: URIRef
    cosine: URIRef
    norm: URIRef
    reliability: URIRef
    # run results in atlas.ttl: pooled direction, selection, overlap edges, findings
    PooledRefusalDirection: URIRef
    SelectionCandidate: URIRef
    OverlapEdge: URIRef
    Finding: URIRef
    pooledOver: URIRef
    candidateDirection: URIRef
    selectedDirection: URIRef
    edgeSource: URIRef
    edgeTarget: URIRef
    ablateFrom: URIRef
    selected: URIRef
    tier: URIRef
    filteredBy: URIRef
    ciLow: URIRef
    ciHigh: URIRef
    correctedCosine: URIRef
    correctedCiLow: URIRef
    correctedCiHigh: URIRef
    sourceFloor: URIRef
    targetFloor: URIRef
    chanceCosine95: URIRef
    distinct: URIRef
    directionSet: URIRef
    question: URIRef
    verdict: URIRef
    findingSubject: URIRef
    rule: URIRef
    value: URIRef
    sampleSize: URIRef
    trusted: URIRef
    # SAE features (mechinterp/sae): the SAE, its latents, and each node's choice of a latent
    SparseAutoencoder: URIRef
    SaeFeature: URIRef
    FeatureSelection: URIRef
    featureIndex: URIRef
    ofSae: URIRef
    feature: URIRef
    rank: URIRef
    attribution: URIRef
    width: URIRef
    topK: URIRef
    tokenCount: URIRef
    fvu: URIRef
    meanL0: URIRef
    deadFraction: URIRef
    # clusters (curation)
    clusterLabel: URIRef
    memberCount: URIRef
    mapsToNode: URIRef
    mappingScore: URIRef


RAC = Namespace(CONDITION_IRI)
"""Minted condition dimensions (`rac:user_age`) and values (`rac:user_age/minor`); open-ended by design."""
