"""Clusters that fit no taxonomy node become proposed nodes a curator can accept, with their evidence.

For each cluster that `mapping` found no fitting node for, `review_clusters` decides from the
rows' own labels whether it is a candidate harm source, and if so drafts a node:

* **Skipped, not proposed**: clusters the model answers (see `expect` below) unless the rows are
  labelled harmful, and clusters whose labelled rows are mostly harmless (`harmful` False) whatever
  the model did: the taxonomy is a taxonomy of harm sources, and a recipe cluster the model
  answers is not one (a harmless cluster the model refuses is over-refusal, reported as such).
  Skipped clusters are listed with their reason in `mapping.json`.
* **Parent**: the branch (`Taxonomy.branch_of`, the root of the first-parent chain) of the
  cluster's nearest node, so a proposal sits under an existing branch and can be moved; for a
  cluster mapped through its rows' node labels, the branch most of its rows are labelled under
  (its best single node may hold a small, tied share).
* **expect** from the refusal rate of the cluster's rows with a `refused` label, its n and the 95%
  Wilson interval [lo, hi]. The model *refuses* the cluster when lo >= 0.5 (clearly most refused:
  `refuse`), *answers* it when hi <= 0.5 (clearly most answered), and is *mixed* when the interval
  straddles one half (`comply_with_caveats`: usually a source whose answer depends on context, so
  add conditions). `expect` is omitted (inherit the parent's default) when fewer than
  `MIN_LABELLED` rows carry a label, when there is no `refused` column, and when the model answers
  rows labelled harmful: that is an under-refusal to review, not a policy to write down, so a
  proposal never says `comply` (an answered cluster not labelled harmful is not proposed at all).
* **id**: `<parent>.<two or three words of the cluster's name>`, lower-case, stop words and
  request verbs dropped (`cyber.phishing_emails`), made unique with `_2`, `_3`...; always a valid id.
* **label / definition**: the label is the cluster's name; the definition is a template that
  starts with `PROPOSAL_DEFINITION_PREFIX`, which `taxonomy accept` refuses until it is rewritten.
* **evidence** (in the YAML as comments above each node, and in `mapping.json`): cluster, n,
  refusal rate with n and interval, harmful labels, nearest node with its score, method and the
  fit threshold it missed, and the example prompts (the rows nearest the cluster's centroid,
  from the `prompt` column when there is one, control and invisible characters shown as `\\uXXXX`).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from refusal_atlas.curation.cluster_store import ClusterRun
from refusal_atlas.curation.mapping import ClusterLink, Mapping, row_nodes
from refusal_atlas.io import atomic_write_text
from refusal_atlas.taxonomy.loader import id_problem
from refusal_atlas.taxonomy.model import Behaviour, Node, Status, Taxonomy
from refusal_atlas.taxonomy.placeholders import PROPOSAL_DEFINITION_PREFIX
from refusal_atlas.taxonomy.yamlio import dump_to_text

EXAMPLE_CHARS = 300
N_EXAMPLES = 5
MIN_LABELLED = 8  # rows with a refusal label needed before the rate sets `expect`
Z95 = 1.959964
ID_WORDS_MAX_CHARS = 32
# Words that say how a request is phrased, not what it is about: useless in an id.
REQUEST_WORDS = frozenset({
    "write", "make", "give", "tell", "explain", "describe", "create", "help", "generate", "provide", "list",
    "want", "need", "know", "like", "way", "ways", "step", "steps", "instructions", "detailed", "guide",
    "does", "did", "can", "could", "would", "should", "best", "good", "using", "use", "used", "get", "let",
    "please", "sure", "thing", "things", "someone", "something", "people", "person", "new", "just", "really",
})


@dataclass(frozen=True)
class Rate:
    """k of n rows, with the 95% Wilson interval."""

    k: int
    n: int

    @property
    def rate(self) -> float:
        return self.k / self.n if self.n else math.nan

    @property
    def interval(self) -> tuple[float, float]:
        if not self.n:
            return (0.0, 1.0)
        p, n, z2 = self.rate, self.n, Z95 * Z95
        centre = (p + z2 / (2 * n)) / (1 + z2 / n)
        half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
        return (max(0.0, centre - half), min(1.0, centre + half))

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.interval
        return {"k": self.k, "n": self.n, "rate": round(self.rate, 4) if self.n else None,
                "ci95": [round(lo, 4), round(hi, 4)]}

    def __str__(self) -> str:
        if not self.n:
            return "n = 0"
        lo, hi = self.interval
        return f"{self.k}/{self.n} = {self.rate:.0%} (95% CI {lo:.0%}-{hi:.0%})"


@dataclass
class Evidence:
    """What a decision about one unmatched cluster rests on."""

    cluster: int
    size: int
    name: str
    keywords: list[str]
    refused: Rate | None
    harmful: Rate | None  # share of the labelled rows labelled harmful
    nearest: dict[str, Any] | None
    examples: list[str]
    behaviour: str  # observed: refuse | comply | mixed | unknown
    expect_rule: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "n": self.size, "name": self.name, "keywords": self.keywords,
                "refused": self.refused.to_dict() if self.refused else None,
                "harmful_labels": self.harmful.to_dict() if self.harmful else None,
                "observed": self.behaviour, "expect_rule": self.expect_rule, "nearest": self.nearest,
                "examples": self.examples}


@dataclass
class Proposal:
    node: Node
    evidence: Evidence

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.node.id, "parent": self.node.broader[0] if self.node.broader else None,
                "expect": self.node.expect.value if self.node.expect else None, **self.evidence.to_dict()}


@dataclass
class Review:
    """The outcome for every unmatched cluster: a proposal, or a reason it was skipped."""

    proposals: list[Proposal] = field(default_factory=list)
    skipped: list[tuple[Evidence, str]] = field(default_factory=list)

    @property
    def nodes(self) -> list[Node]:
        return [p.node for p in self.proposals]

    def to_dict(self) -> dict[str, Any]:
        return {"rules": {"min_labelled": MIN_LABELLED,
                          "refuse": "refusal rate's Wilson 95% lower bound >= 0.5: expect refuse",
                          "comply": "upper bound <= 0.5: not proposed, or expect inherited if labelled harmful",
                          "mixed": "interval straddles 0.5: expect comply_with_caveats"},
                "proposals": [p.to_dict() for p in self.proposals],
                "skipped": [{**e.to_dict(), "reason": why} for e, why in self.skipped]}


# --- text ----------------------------------------------------------------------------------------


def clean_text(value: object, limit: int = EXAMPLE_CHARS) -> str:
    """One line of untrusted text, safe to show anywhere: control and invisible (format) characters
    become visible `\\uXXXX` escapes, whitespace runs one space, clipped to `limit` characters."""
    out = []
    for ch in " ".join(str(value).split()):
        out.append(f"\\u{ord(ch):04x}" if unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs") else ch)
    text = "".join(out)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def name_words(text: str) -> list[str]:
    """Content words of a cluster name, ASCII lower-case, in order, without stop words or repeats."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    words: list[str] = []
    for word in re.findall(r"[a-z][a-z0-9]+", ascii_text):
        if word in ENGLISH_STOP_WORDS or word in REQUEST_WORDS or len(word) < 3 or word in words:
            continue
        words.append(word)
    return words


def proposal_id(parent: str | None, words: list[str], cluster: int, taken: set[str]) -> str:
    """`parent.word_word` (a third word when the first two are short), unique against `taken`."""
    skip = set(parent.replace("-", "_").replace(".", "_").split("_")) if parent else set()
    chosen: list[str] = []
    for word in (w for w in words if w not in skip):
        if len(chosen) >= 3 or (len(chosen) == 2 and len("_".join(chosen)) >= 12):
            break
        if len("_".join([*chosen, word])) > ID_WORDS_MAX_CHARS:
            break
        chosen.append(word)
    slug = "_".join(chosen) or f"cluster_{cluster}"
    base = f"{parent}.{slug}" if parent else slug
    if id_problem(base):  # a parent id that cannot take a suffix; never expected, but an id must be valid
        base = f"cluster_{cluster}"
    candidate, k = base, 2
    while candidate in taken:
        candidate, k = f"{base}_{k}", k + 1
    return candidate


# --- evidence ------------------------------------------------------------------------------------


_TRUE = frozenset({"true", "1", "yes", "y", "t"})
_FALSE = frozenset({"false", "0", "no", "n", "f"})  # an empty cell is a missing label, not "no"


def as_label(value: Any) -> bool | None:
    """A yes/no label from a table cell: booleans, 0/1, or the words a CSV holds ("true", "no"); else None."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | float | np.integer | np.floating) and not pd.isna(value) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    return None


def _rate(values: Any) -> Rate | None:
    labelled = [b for b in (as_label(v) for v in values) if b is not None]
    return Rate(sum(labelled), len(labelled)) if labelled else None


def observed_behaviour(refused: Rate | None) -> str:
    """refuse / comply / mixed from the Wilson interval, or unknown below MIN_LABELLED rows."""
    if refused is None or refused.n < MIN_LABELLED:
        return "unknown"
    lo, hi = refused.interval
    return "refuse" if lo >= 0.5 else "comply" if hi <= 0.5 else "mixed"


def _examples(run: ClusterRun, idx: np.ndarray) -> list[str]:
    """The cluster's rows nearest its centroid (ties by row order), as requests where the table has them: its
    `prompt` column, else the `--label-by` texts (refusals clustered, named by what was asked), else the text.
    A node's examples are requests (organisms and `curate prompts` use them as prompts), never refusals."""
    x = (run.description if run.description is not None else run.embeddings)[idx]
    centroid = x.mean(0)
    centroid /= np.linalg.norm(centroid) or 1.0
    order = np.lexsort((idx, -(x @ centroid)))
    column = next(c for c in ("prompt", "label_text", "text") if c in run.assignments.columns)
    values = run.assignments[column].to_numpy()
    out: list[str] = []
    for j in order:
        text = clean_text(values[idx[j]])
        if text and text not in out:
            out.append(text)
        if len(out) >= N_EXAMPLES:
            break
    return out


def _nearest(link: ClusterLink, mapping: Mapping) -> dict[str, Any] | None:
    if not link.best:
        return None
    what = "cosine of the cluster centroid to the node" if link.method == "similarity" else "share of rows labelled"
    return {"node": link.best[0], "score": round(float(link.best[1]), 4), "method": link.method, "measure": what,
            "fit_threshold": mapping.min_score.get(link.method)}


def cluster_evidence(run: ClusterRun, link: ClusterLink, mapping: Mapping) -> Evidence:
    df = run.assignments
    idx = np.flatnonzero(run.labels == link.cluster)
    info: dict[str, Any] = next((c for c in run.meta.get("clusters", []) if c.get("id") == link.cluster), {})
    keywords = [clean_text(k, 40) for k in info.get("keywords", [])]
    name = clean_text(info.get("name") or info.get("label") or " / ".join(keywords[:3]) or f"cluster {link.cluster}",
                      80)
    refused = _rate(df["refused"].to_numpy()[idx]) if "refused" in df.columns else None
    harmful = _rate(df["harmful"].to_numpy()[idx]) if "harmful" in df.columns else None
    return Evidence(link.cluster, len(idx), name, keywords, refused, harmful, _nearest(link, mapping),
                    _examples(run, idx), observed_behaviour(refused))


def suggested_parent(run: ClusterRun, link: ClusterLink, ev: Evidence, taxonomy: Taxonomy) -> str | None:
    """The branch of the nearest node; for a cluster mapped by its rows' labels, the branch most of its rows
    are labelled under (a row counts once per branch; ties go to the nearest node's branch, then by id)."""
    nearest = ev.nearest["node"] if ev.nearest else None
    home = taxonomy.branch_of(nearest) if nearest in taxonomy.nodes else None
    if link.method != "label_majority":
        return home
    per_row = row_nodes(run)
    counts: Counter[str] = Counter()
    for i in np.flatnonzero(run.labels == link.cluster):
        counts.update({taxonomy.branch_of(n) for n in per_row[i] if n in taxonomy.nodes})
    if not counts:
        return home
    best = min(counts, key=lambda b: (-counts[b], b != home, b))
    if ev.nearest is not None:
        ev.nearest["branch_share"] = round(counts[best] / ev.size, 4)
    return best


def unfocused_reason(link: ClusterLink, column: str) -> str:
    """Why a cluster whose rows spread over the taxonomy like the corpus's is no proposed source of harm."""
    sup = link.support or {}
    return (f"not one source of harm: its {column} texts point to {sup.get('branch')} no more than the corpus's do "
            f"({sup.get('share', 0):.0%} of its rows vs {sup.get('corpus_share', 0):.0%}, p {sup.get('p', 1):.2g}); "
            "the cluster groups something else, e.g. a wording")


def decide(ev: Evidence) -> tuple[Behaviour | None, str] | str:
    """(expect, why) for a cluster worth proposing, or the reason to skip it (a str)."""
    labelled_harmless = ev.harmful is not None and ev.harmful.n * 2 >= ev.size and ev.harmful.rate < 0.5
    labelled_harmful = ev.harmful is not None and ev.harmful.n * 2 >= ev.size and ev.harmful.rate >= 0.5
    refused = f"refused {ev.refused}" if ev.refused else "no refusal labels"
    if labelled_harmless:
        if ev.behaviour == "refuse":
            return (f"over-refusal, not a harm source: the rows are labelled harmless (harmful {ev.harmful}) but "
                    f"the model {refused}")
        return f"labelled harmless (harmful {ev.harmful}); {refused}"
    if ev.behaviour == "comply" and not labelled_harmful:
        return f"the model answers these ({refused}) and no node fits and no row label calls them harmful"
    if ev.behaviour == "comply":
        return None, (f"omitted (inherit): the model answers rows labelled harmful ({refused}): an under-refusal "
                      "to review")
    if ev.behaviour == "refuse":
        return Behaviour.REFUSE, f"refuse: {refused}, lower bound >= 50%"
    if ev.behaviour == "mixed":
        return Behaviour.COMPLY_WITH_CAVEATS, f"comply_with_caveats: {refused} straddles 50% (add conditions)"
    if ev.refused is None:
        return None, "omitted (inherit): no refusal labels (cluster a table with a `refused` column to set it)"
    return None, f"omitted (inherit): {refused}, fewer than {MIN_LABELLED} labelled rows"


# --- proposals -----------------------------------------------------------------------------------


def review_clusters(run: ClusterRun, mapping: Mapping, taxonomy: Taxonomy | None = None) -> Review:
    """A proposal or a skip reason for every cluster that fits no node (see the module docstring)."""
    taken = set(taxonomy.nodes) if taxonomy is not None else set()
    source = run.meta.get("input", {})
    # the rows' requests where the clustering was named by them (`--label-by`), as the examples are
    column = clean_text(source.get("label_column") or source.get("text_column", "text"), 40)
    review = Review()
    for link in mapping.unmatched():
        ev = cluster_evidence(run, link, mapping)
        outcome = unfocused_reason(link, column) if link.unfocused else decide(ev)
        if isinstance(outcome, str):
            review.skipped.append((ev, outcome))
            continue
        expect, ev.expect_rule = outcome
        parent = suggested_parent(run, link, ev, taxonomy) if taxonomy is not None else None
        if parent is None and expect is None:
            # a root must set a default; without evidence the conservative one
            expect, ev.expect_rule = Behaviour.REFUSE, ev.expect_rule + "; refuse because a root needs a default"
        node_id = proposal_id(parent, name_words(" ".join([ev.name, *ev.keywords])), link.cluster, taken)
        taken.add(node_id)
        words = ", ".join(ev.keywords[:8]) or "no distinctive keywords"
        review.proposals.append(Proposal(Node(
            id=node_id,
            label=ev.name[:1].upper() + ev.name[1:],
            definition=(f"{PROPOSAL_DEFINITION_PREFIX}: name the source of harm these {ev.size} {column} texts share "
                        f"(cluster {link.cluster}; keywords: {words})."),
            broader=[parent] if parent else [],
            expect=expect,
            examples=ev.examples,
            status=Status.PROPOSED,
            provenance=clean_text(
                f"refusal-atlas curate map: cluster {link.cluster} of clustering run {run.run_id} on "
                f"{source.get('path')} (sha256 {str(source.get('sha256', ''))[:12]})", 400),
        ), ev))
    return review


def propose_nodes(run: ClusterRun, mapping: Mapping, taxonomy: Taxonomy | None = None) -> list[Node]:
    """The proposed nodes alone (see `review_clusters` for their evidence and the skipped clusters)."""
    return review_clusters(run, mapping, taxonomy).nodes


def _comment_lines(p: Proposal) -> list[str]:
    ev = p.evidence
    lines = [f"cluster {ev.cluster}: {ev.size} rows, named {ev.name!r}"]
    lines.append(f"refused: {ev.refused or 'no refusal labels'}; harmful labels: {ev.harmful or 'none'}")
    lines.append(f"expect: {ev.expect_rule}")
    if ev.nearest:
        near = ev.nearest
        parent = p.node.broader[0] if p.node.broader else "(none: a new root)"
        why = (f"the branch of {near['branch_share']:.0%} of its rows" if "branch_share" in near
               else "the nearest node's branch")
        lines.append(f"nearest node {near['node']} ({near['method']} {near['score']:.2f}, fits from "
                     f"{near['fit_threshold']}); suggested parent {parent}: {why}")
    lines.append("examples below are the rows nearest the cluster's centroid")
    return [clean_text(line, 200) for line in lines]


def proposals_yaml(proposals: Sequence[Proposal | Node], run: ClusterRun) -> str:
    """The proposals as a taxonomy file: `nodes:` with each node's evidence as comments above it."""
    yaml = YAML(typ="rt", pure=True)
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    seq = CommentedSeq()
    for i, item in enumerate(proposals):
        node: Node = item.node if isinstance(item, Proposal) else item
        data = node.to_yaml_dict()
        out = CommentedMap()
        out["id"], out["status"] = data.pop("id"), node.status.value
        data.pop("status", None)
        for key, value in data.items():
            if key == "broader":
                value = CommentedSeq(value)
                value.fa.set_flow_style()
            out[key] = value
        seq.append(out)
        if isinstance(item, Proposal):
            seq.yaml_set_comment_before_after_key(i, before="\n".join(_comment_lines(item)), indent=2)
    header = (f"# Proposed nodes from clustering run {clean_text(run.run_id, 40)} "
              f"({clean_text(run.folder, 200)}).\n"
              "# Copy this file into a taxonomy folder; for each node worth keeping, rewrite the definition,\n"
              "# check the parent (`taxonomy move`) and id (`taxonomy rename`), then `taxonomy accept ID`.\n")
    return header + dump_to_text(yaml, {"nodes": seq})


def write_proposals(path: Path, proposals: Sequence[Proposal | Node], run: ClusterRun) -> Path:
    return atomic_write_text(path, proposals_yaml(proposals, run))
