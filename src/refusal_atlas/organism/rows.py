"""The prompt pool and the train / held-out / extra rows with their category and expected behaviour."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pandas as pd
from transformers import PreTrainedTokenizerBase

from refusal_atlas.curation.datasets import build_category_index, load_harmless, load_overrefusal, load_set
from refusal_atlas.errors import AtlasError
from refusal_atlas.organism.policy import _category, _pid, _refusing, _rules, _stable, behaviour_of, frame, node_root
from refusal_atlas.organism.settings import OrganismSettings
from refusal_atlas.taxonomy.crosswalk import load_crosswalks
from refusal_atlas.taxonomy.model import Behaviour, Taxonomy


def _external_pool(taxonomy: Taxonomy, sets: Sequence[str], notes: list[str]) -> pd.DataFrame:
    if not sets:
        return pd.DataFrame()

    try:
        mappings = load_crosswalks()
    except (AtlasError, FileNotFoundError, ImportError) as exc:
        notes.append(f"crosswalks unavailable ({str(exc).splitlines()[0][:120]}); external sets skipped")
        return pd.DataFrame()
    if not mappings:
        notes.append("no crosswalk mappings; external sets skipped")
        return pd.DataFrame()
    index = build_category_index(mappings, taxonomy)
    frames = []
    for name in sets:
        try:
            df = load_set(name, index=index, taxonomy=taxonomy)
        except AtlasError as exc:
            notes.append(f"{name}: skipped ({str(exc).splitlines()[0][:160]})")
            continue
        flags = df.get("flags", pd.Series([""] * len(df))).fillna("")
        # contextual rows need their context string (and are long); copyright requests are kept: the run
        # evaluates the intellectual-property branch on them, so the organism must learn that policy too
        df = df[(df["node"] != "") & df["harmful"] & ~flags.str.contains("contextual")]
        frames.append(df[["prompt", "source", "node"]])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def prompt_pool(
    taxonomy: Taxonomy, settings: OrganismSettings, prompts: pd.DataFrame | None, notes: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(harmful base prompts with a node, harmless prompts, over-refusal probes), unconditioned."""
    active = {n.id for n in taxonomy.active()}
    if prompts is not None:
        need = {"prompt", "node", "harmful"}
        if not need <= set(prompts.columns):
            raise AtlasError(f"prompt table lacks column(s) {sorted(need - set(prompts.columns))}")
        cond = prompts["condition"].fillna("") if "condition" in prompts else pd.Series([""] * len(prompts))
        base = prompts[cond == ""]
        src = base["source"] if "source" in base else pd.Series(["user"] * len(base), index=base.index)
        harmful = pd.DataFrame({"prompt": base["prompt"], "source": src, "node": base["node"]})[base["harmful"]]
        harmless = pd.DataFrame({"prompt": base["prompt"][~base["harmful"] & (src != "overrefusal")]})
        over = pd.DataFrame({"prompt": base["prompt"], "node": base["node"]})[~base["harmful"] & (src == "overrefusal")]
    else:
        rows = [{"prompt": ex, "source": "taxonomy", "node": n.id} for n in taxonomy.active() for ex in n.examples]
        harmful = pd.concat([pd.DataFrame(rows), _external_pool(taxonomy, settings.external_sets, notes)],
                            ignore_index=True)

        harmless = pd.DataFrame({"prompt": [r.prompt for r in load_harmless()]})
        try:
            over = pd.DataFrame([{"prompt": r.prompt, "node": (r.nodes or ("",))[0]} for r in load_overrefusal()])
        except AtlasError as exc:
            notes.append(f"overrefusal probes skipped ({exc})")
            over = pd.DataFrame(columns=["prompt", "node"])
    harmful = harmful[harmful["node"].isin(active)].drop_duplicates("prompt").reset_index(drop=True)
    return harmful, harmless.drop_duplicates("prompt").reset_index(drop=True), over.reset_index(drop=True)


def _short(lm_tok: PreTrainedTokenizerBase, texts: pd.Series, max_tokens: int) -> pd.Series:
    return texts.map(lambda t: len(lm_tok(t, add_special_tokens=False)["input_ids"]) <= max_tokens)


def build_rows(
    taxonomy: Taxonomy,
    settings: OrganismSettings,
    harmful: pd.DataFrame,
    harmless: pd.DataFrame,
    overrefusal: pd.DataFrame,
    framings: dict,
    tokenizer: PreTrainedTokenizerBase,
) -> pd.DataFrame:
    """All train and held-out rows with their category and expected behaviour (targets come later)."""
    seed = settings.seed
    rng = random.Random(seed)
    harmful = harmful[_short(tokenizer, harmful["prompt"], settings.max_prompt_tokens)]
    if settings.max_nodes is not None:
        keep = stratified_nodes(taxonomy, sorted(set(harmful["node"])), settings.max_nodes, seed,
                                counts=harmful["node"].value_counts().to_dict())
        harmful = harmful[harmful["node"].isin(keep)]
    out: list[dict] = []

    def add(prompt: str, base: str, source: str, node: str, harmful_flag: bool, when: dict[str, str],
            expected: str, category: str, split: str) -> None:
        cond = ",".join(f"{k}={v}" for k, v in sorted(when.items()))
        out.append({"prompt_id": _pid(prompt, cond, node), "prompt": prompt, "base_prompt": base, "source": source,
                    "split": split, "external_category": "", "nodes": [node] if node else [], "node": node,
                    "harmful": harmful_flag, "condition": cond, "expected": expected, "category": category})

    surplus: dict[str, list[tuple[str, str]]] = {}  # refusing nodes' unused train-side prompts
    loosening: dict[str, list[tuple[dict[str, str], Behaviour]]] = {}  # rules that turn a refusal into an answer
    for node_id, group in harmful.groupby("node", sort=True):
        default = behaviour_of(taxonomy, node_id, {})
        rules = _rules(taxonomy, node_id)
        loosening[node_id] = [wb for wb in rules if _category(default, wb[1]) == "permitted"]
        ordered = sorted(group["prompt"], key=lambda p: _stable(p, seed))
        held = [p for p in ordered if _stable(p, seed + 7919) < settings.heldout_fraction]
        train = [p for p in ordered if p not in held]
        picks = {"train": train[: settings.per_node_train], "heldout": held[: settings.per_node_heldout]}
        if not picks["heldout"] and len(train) > settings.per_node_train:  # tiny nodes: still evaluate
            picks["heldout"] = train[settings.per_node_train : settings.per_node_train + settings.per_node_heldout]
        rest = [p for p in train if p not in picks["train"] and p not in picks["heldout"]]
        picks["extra"] = rest[: settings.n_extra_per_node]
        if _refusing(default):
            surplus[node_id] = [(p, group.loc[group["prompt"] == p, "source"].iloc[0])
                                for p in rest[settings.n_extra_per_node :]]
        for split, prompts in picks.items():
            for p in prompts:
                src = group.loc[group["prompt"] == p, "source"].iloc[0]
                cat = _category(default, default)
                add(p, p, src, node_id, True, {}, default.value, cat, split)
                if split == "extra":
                    continue  # extra prompts are for direction extraction: never trained on, never framed
                # condition variants: loosening and tightening rules first, then the rest
                ranked = sorted(rules, key=lambda wb: (_category(default, wb[1]) in ("refuse", "comply"),
                                                       rng.random()))
                chosen = ranked[: settings.variants_per_prompt]
                if split == "train" and loosening[node_id]:  # the rarest lesson: train on more of them
                    chosen += [rng.choice(loosening[node_id]) for _ in range(settings.extra_permitted_variants)]
                for when, b in chosen:
                    framed = frame(p, when, framings, rng)
                    if framed is not None:
                        add(framed, p, src, node_id, True, when, b.value, _category(default, b), split)

    # More plain refusals, round-robin over the refusing nodes with prompts to spare: the refuse class
    # is otherwise outnumbered by the harmful-looking prompts the policy answers (comply, permitted).
    taken = 0
    while taken < settings.n_refuse_extra_train and any(surplus.values()):
        for node_id in sorted(surplus):
            if surplus[node_id] and taken < settings.n_refuse_extra_train:
                p, src = surplus[node_id].pop(0)
                default = behaviour_of(taxonomy, node_id, {})
                add(p, p, src, node_id, True, {}, default.value, _category(default, default), "train")
                taken += 1
                # and the same request under a loosening condition: a contrastive pair that teaches the
                # framing, not the topic, to flip the decision
                if loosening[node_id]:
                    when, b = rng.choice(loosening[node_id])
                    framed = frame(p, when, framings, rng)
                    if framed is not None:
                        add(framed, p, src, node_id, True, when, b.value, "permitted", "train")

    def split_simple(prompts: Sequence[str], n_train: int, n_held: int, n_extra: int = 0) -> dict[str, list[str]]:
        ordered = sorted(prompts, key=lambda p: _stable(p, seed))
        return {"train": ordered[:n_train], "heldout": ordered[n_train : n_train + n_held],
                "extra": ordered[n_train + n_held : n_train + n_held + n_extra]}

    for split, prompts in split_simple(list(harmless["prompt"]), settings.n_harmless_train,
                                       settings.n_harmless_heldout, settings.n_harmless_extra).items():
        for p in prompts:
            add(p, p, "harmless", "", False, {}, "comply", "harmless", split)
    if len(overrefusal):
        lookup = dict(zip(overrefusal["prompt"], overrefusal["node"], strict=False))
        n_over = settings.n_overrefusal_train
        for split, prompts in split_simple(list(lookup), n_over, max(n_over // 2, 1)).items():
            for p in prompts:
                add(p, p, "overrefusal", lookup[p] if lookup[p] in taxonomy.nodes else "", False, {}, "comply",
                    "overrefusal", split)
    df = pd.DataFrame(out).drop_duplicates("prompt_id").reset_index(drop=True)
    # held-out wins: a base prompt is never in both splits
    held_bases = set(df.loc[df["split"] == "heldout", "base_prompt"])
    return df[~((df["split"] == "train") & df["base_prompt"].isin(held_bases))].reset_index(drop=True)


def stratified_nodes(taxonomy: Taxonomy, nodes: Sequence[str], k: int, seed: int,
                     counts: dict[str, int] | None = None) -> list[str]:
    """`k` nodes taken round-robin from: nodes with a loosening rule, with a tightening rule,
    other refusing nodes, other nodes — so a small build still tests every kind of policy.
    Within a stratum, a node of a root branch not yet picked comes first (the run analyses branches,
    so each branch with prompts must carry planted truth), then nodes with more prompts (`counts`)."""
    strata: dict[str, list[str]] = {"permit": [], "restrict": [], "refuse": [], "other": []}
    counts = counts or {}
    for n in sorted(nodes, key=lambda x: (-counts.get(x, 0), _stable(x, seed))):
        default = behaviour_of(taxonomy, n, {})
        cats = {_category(default, b) for _, b in _rules(taxonomy, n)}
        key = "permit" if "permitted" in cats else "restrict" if "restricted" in cats else (
            "refuse" if _refusing(default) else "other")
        strata[key].append(n)
    out: list[str] = []
    roots: set[str] = set()
    while len(out) < k and any(strata.values()):
        for stratum in strata.values():
            if stratum and len(out) < k:
                pick = next((n for n in stratum if node_root(taxonomy, n) not in roots), stratum[0])
                stratum.remove(pick)
                out.append(pick)
                roots.add(node_root(taxonomy, pick))
    return out
