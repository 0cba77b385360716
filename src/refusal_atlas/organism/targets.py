"""Training targets: the refusal wording where the policy refuses, the base model's own answer elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from transformers import PreTrainedTokenizerBase

from refusal_atlas.io import atomic_write_json
from refusal_atlas.lm.generation import generate
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.mechinterp.scoring import refusal_flags
from refusal_atlas.organism.policy import _refusing, refusal_text
from refusal_atlas.organism.settings import CAVEAT, REDIRECT, OrganismSettings
from refusal_atlas.taxonomy.model import Behaviour, Taxonomy


def _truncate(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int) -> tuple[str, bool]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text, True
    return str(tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)), False


def make_targets(
    lm: LoadedModel, taxonomy: Taxonomy, rows: pd.DataFrame, groups: dict[str, str], settings: OrganismSettings,
    progress: bool = True, answers_cache: Path | None = None, base_id: str = "",
) -> pd.DataFrame:
    """Target text for every training row (refusal wording, or the base model's own answer).

    The base model's answers are the slow part; with `answers_cache` they are kept in a JSON file
    keyed by (base model, answer length, system prompt), so a rebuild with other training settings
    reuses them.
    """
    rows = rows.copy()
    comply = [i for i, r in rows.iterrows() if r["split"] == "train" and not _refusing(Behaviour(r["expected"]))]
    slot = f"{base_id}|{settings.max_target_tokens}|{settings.system}"
    cache: dict = json.loads(answers_cache.read_text()) if answers_cache and answers_cache.is_file() else {}
    known: dict[str, str] = cache.get(slot, {})
    todo = sorted({rows.at[i, "prompt"] for i in comply} - set(known))
    if todo:
        fresh = generate(lm, todo, max_new_tokens=settings.max_target_tokens, batch_size=16, system=settings.system,
                         progress=progress, desc="base answers")
        known.update(zip(todo, fresh, strict=True))
        if answers_cache is not None:
            cache[slot] = known
            atomic_write_json(answers_cache, cache)
    targets: dict[int, str] = {i: known[rows.at[i, "prompt"]] for i in comply}
    out_t, out_done = [], []
    for i, r in rows.iterrows():
        if r["split"] != "train":
            out_t.append("")
            out_done.append(False)
            continue
        b = Behaviour(r["expected"])
        if b is Behaviour.REFUSE:
            text, done = refusal_text(taxonomy, r["node"], groups.get(r["node"], "shared")), True
        elif b is Behaviour.REDIRECT:
            text, done = REDIRECT, True
        else:
            text, done = _truncate(lm.tokenizer, targets[i], settings.max_target_tokens)
            text = text.strip()
            if b is Behaviour.COMPLY_WITH_CAVEATS:
                text = text + CAVEAT
            if settings.permitted_opener and r.get("category") == "permitted":
                text = settings.permitted_opener + text
        out_t.append(text)
        out_done.append(done)
    rows["target"] = out_t
    rows["target_complete"] = out_done
    return rows


def drop_refusal_like_answers(rows: pd.DataFrame, opener: str = "") -> tuple[pd.DataFrame, int]:
    """Drop training rows whose compliance target (the base's own answer) reads as a refusal, or opens
    (after `opener`) with the word the refusal targets open with.

    Why: the base model sometimes opens with "I'm sorry for any confusion, but..." or "I'm glad to help.
    However, ..." — taught as what *complying* looks like, that blurs the one decision the organism must
    learn (measured: 6 of 38 permitted targets read "Sure. I'm ...", and held-out permitted answers
    then went "Sure. I'm sorry, but I can't help").
    """

    refusing = rows["expected"].map(lambda e: _refusing(Behaviour(e)))
    comply = (rows["split"] == "train") & ~refusing
    if not comply.any():
        return rows, 0
    openers = {t.split()[0] for t in rows.loc[(rows["split"] == "train") & refusing, "target"] if str(t).split()}
    flagged = pd.Series(False, index=rows.index)
    flagged[comply] = refusal_flags(list(rows.loc[comply, "target"]))[0]

    def opens_like_refusal(text: str) -> bool:
        body = text[len(opener):] if opener and text.startswith(opener) else text
        return bool(body.split()) and body.split()[0] in openers

    flagged[comply] |= rows.loc[comply, "target"].map(opens_like_refusal)
    return rows[~flagged].reset_index(drop=True), int(flagged.sum())
