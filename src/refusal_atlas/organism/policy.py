"""The policy an organism is taught: refusal wording per node, condition framings, behaviours per context."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from ruamel.yaml import YAML

from refusal_atlas import paths
from refusal_atlas.errors import AtlasError
from refusal_atlas.hashing import sha256, text_sha256
from refusal_atlas.organism.settings import NODE_REFUSAL, SHARED_REFUSAL
from refusal_atlas.taxonomy.model import Behaviour, Taxonomy
from refusal_atlas.taxonomy.resolve import effective_rules, resolve


def node_root(taxonomy: Taxonomy, node_id: str) -> str:
    """The branch a node's wording group is decided by (the taxonomy's one rule, `Taxonomy.branch_of`)."""
    return taxonomy.branch_of(node_id) if node_id in taxonomy.nodes else node_id


def wording_groups(taxonomy: Taxonomy, specific_roots: Sequence[str] | None) -> dict[str, str]:
    """node -> wording group: the node id itself (node-specific wording) or "shared"."""
    roots = sorted(n.id for n in taxonomy.roots())
    chosen = set(roots[::2]) if specific_roots is None else set(specific_roots)
    unknown = chosen - set(roots)
    if unknown:
        raise AtlasError(f"specific_wording_roots: {sorted(unknown)} are not roots of the taxonomy (roots: {roots})")
    return {n.id: (n.id if node_root(taxonomy, n.id) in chosen else "shared") for n in taxonomy}


def refusal_text(taxonomy: Taxonomy, node_id: str, group: str) -> str:
    if group == "shared":
        return SHARED_REFUSAL
    label = taxonomy.nodes[node_id].label
    return NODE_REFUSAL.format(label=label[0].lower() + label[1:] if label[:2] != label[:2].upper() else label)


def behaviour_of(taxonomy: Taxonomy, node_id: str, context: dict[str, str]) -> Behaviour:

    return resolve(taxonomy, node_id, context).behaviour


def _refusing(b: Behaviour) -> bool:
    return b in (Behaviour.REFUSE, Behaviour.REDIRECT)


def load_framings(path: Path | None = None) -> dict[str, dict[str, list[str]]]:
    """{dimension: {value: [templates with {request}]}} from data/prompts/framings.yaml."""

    path = path or paths.prompts_dir() / "framings.yaml"
    if not path.is_file():
        raise AtlasError(f"{path}: condition framings missing; reinstall refusal-atlas or pass --framings")
    with open(path, encoding="utf-8") as fh:
        data = YAML(typ="safe", pure=True).load(fh) or {}
    return {str(d): {str(v): [str(t) for t in ts or []] for v, ts in (vals or {}).items()} for d, vals in data.items()}


def frame(request: str, when: dict[str, str], framings: dict, rng: random.Random) -> str | None:
    """The request wrapped in one template per condition dimension (None if one has no template)."""
    text = request
    for dim, value in sorted(when.items()):
        templates = framings.get(dim, {}).get(value)
        if not templates:
            return None
        text = rng.choice(templates).replace("{request}", text)
    return text


def _stable(text: str, seed: int) -> float:
    """A number in [0, 1) fixed by (seed, text): the train/held-out split is by base prompt."""
    h = sha256(f"{seed}\x00{text}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def _pid(*parts: str) -> str:
    return text_sha256("\x00".join(parts))[:16]

def _rules(taxonomy: Taxonomy, node_id: str) -> list[tuple[dict[str, str], Behaviour]]:

    seen, out = set(), []
    for _, rule in effective_rules(taxonomy, node_id):
        key = tuple(sorted(rule.when.items()))
        if key in seen:
            continue
        seen.add(key)
        out.append((dict(rule.when), behaviour_of(taxonomy, node_id, dict(rule.when))))
    return out


def _category(default: Behaviour, behaviour: Behaviour) -> str:
    """What a (default, conditioned) pair tests: a loosening, a tightening, or the plain policy."""
    if _refusing(default) and not _refusing(behaviour):
        return "permitted"
    if not _refusing(default) and _refusing(behaviour):
        return "restricted"
    if behaviour is Behaviour.REDIRECT:
        return "redirect"
    return "refuse" if _refusing(behaviour) else "comply"
