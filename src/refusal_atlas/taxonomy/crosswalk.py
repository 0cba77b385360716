"""Crosswalks from our nodes to other taxonomies (HarmBench, AILuminate, ...) as SSSOM TSV.

A file `<source>.sssom.tsv` starts with `#`-prefixed YAML metadata (at least a `curie_map`),
then a tab-separated header row and one mapping per row::

    #curie_map:
    #  ra: https://w3id.org/refusal-atlas/taxonomy/
    #  harmbench: https://w3id.org/refusal-atlas/external/harmbench/
    subject_id	subject_label	predicate_id	object_id	object_label	mapping_justification
    ra:weapons.explosives	Explosives	skos:narrowMatch	harmbench:chemical_biological	...	semapv:Manual...

`subject_id` is one of our nodes (the CURIE's local part is the node id); `object_id` is the
external category. External categories have no official IRIs, so the project mints them
under `https://w3id.org/refusal-atlas/external/<source>/<slug>`.
"""

from __future__ import annotations

import csv
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from refusal_atlas import paths
from refusal_atlas.errors import AtlasError, ValidationErrors
from refusal_atlas.io import brief
from refusal_atlas.taxonomy.model import Taxonomy
from refusal_atlas.taxonomy.yamlio import Problem, decode_utf8

EXTERNAL_BASE = "https://w3id.org/refusal-atlas/external/"
EXTERNAL_SOURCES = ("harmbench", "strongreject", "ailuminate", "llamaguard3", "mitrisk", "donotanswer")
BUILTIN_PREFIXES: dict[str, str] = {
    "skos": "http://www.w3.org/2004/02/skos/core#",
    "semapv": "https://w3id.org/semapv/vocab/",
    "ra": "https://w3id.org/refusal-atlas/taxonomy/",
    **{source: f"{EXTERNAL_BASE}{source}/" for source in EXTERNAL_SOURCES},
}
PREDICATES = ("skos:exactMatch", "skos:closeMatch", "skos:broadMatch", "skos:narrowMatch", "skos:relatedMatch")
REQUIRED_COLUMNS = ("subject_id", "predicate_id", "object_id", "mapping_justification")
SUFFIX = ".sssom.tsv"
# A taxonomy folder carries its own crosswalks here (`taxonomy init` copies the shipped ones).
LOCAL_DIR = "crosswalks"


@dataclass(frozen=True)
class Mapping:
    """One SSSOM row; `node_id` is the subject's local part, `source` the object's prefix."""

    subject_id: str
    predicate_id: str
    object_id: str
    mapping_justification: str
    object_label: str = ""
    subject_label: str = ""
    confidence: float | None = None
    comment: str = ""
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    source_file: str = field(default="", compare=False)
    line: int = field(default=0, compare=False)

    @property
    def node_id(self) -> str:
        return self.subject_id.split(":", 1)[1] if ":" in self.subject_id else self.subject_id

    @property
    def source(self) -> str:
        return self.object_id.split(":", 1)[0]

    @property
    def object_iri(self) -> str:
        return external_iri(self.object_id)


def external_iri(curie: str, curie_map: dict[str, str] | None = None) -> str:
    """Expand a CURIE (e.g. `harmbench:illegal`) with `curie_map` or the built-in prefixes."""
    if curie.startswith(("http://", "https://")):
        return curie
    prefix, sep, local = curie.partition(":")
    if not sep or not prefix or not local:
        raise AtlasError(f"{brief(curie)} is not a CURIE (prefix:local)")
    prefixes = {**BUILTIN_PREFIXES, **(curie_map or {})}
    if prefix not in prefixes:
        raise AtlasError(f"unknown CURIE prefix {brief(prefix)} in {brief(curie)}; "
                         f"known: {', '.join(sorted(prefixes))}")
    return prefixes[prefix] + quote(local, safe="._-~")


def crosswalk_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.glob(f"*{SUFFIX}") if p.is_file())


def crosswalk_dir_for(taxonomy_dir: Path | str | None, crosswalks: Path | str | None = None) -> Path | None:
    """The crosswalk folder that goes with a taxonomy, or None when it has none.

    `crosswalks` when given; else `<taxonomy>/crosswalks/` when it exists (a folder made by
    `taxonomy init`, or by hand); else the shipped `data/crosswalks/` for the shipped taxonomy
    (`taxonomy_dir` None or the shipped folder). Another taxonomy without its own folder has none:
    the shipped crosswalks name the shipped taxonomy's ids, which it may not have.
    """
    if crosswalks is not None:
        return Path(crosswalks)
    if taxonomy_dir is not None:
        local = Path(taxonomy_dir) / LOCAL_DIR
        if local.is_dir():
            return local
    try:
        shipped = taxonomy_dir is None or Path(taxonomy_dir).resolve() == paths.default_taxonomy_dir().resolve()
        return paths.crosswalk_dir() if shipped and paths.crosswalk_dir().is_dir() else None
    except FileNotFoundError:
        return None


def no_crosswalks_warning(taxonomy_dir: Path | str | None) -> str:
    """The one-line warning for a taxonomy that has no crosswalks (what is missing and how to add them)."""
    return (f"warning: no crosswalks for the taxonomy {taxonomy_dir}: external categories (llamaguard3:S9, "
            f"harmbench:...) map to none of its nodes; put *.sssom.tsv files in {Path(str(taxonomy_dir)) / LOCAL_DIR}/ "
            "(`taxonomy init` copies the shipped ones) or pass --crosswalks DIR")


def rename_subjects(text: str, ids: dict[str, str]) -> tuple[str, list[tuple[int, str, str]]]:
    """`text` of an SSSOM file with every subject_id whose node id is a key of `ids` renamed.

    Only the subject_id cell of a mapping row changes (its CURIE prefix kept); metadata, comments,
    other cells and line endings stay byte for byte. Returns (new text, [(line, old CURIE, new CURIE)]).
    """
    lines = text.splitlines(keepends=True)
    index = 0
    while index < len(lines) and (lines[index].startswith("#") or not lines[index].strip()):
        index += 1
    if index >= len(lines):
        return text, []
    header = lines[index].rstrip("\r\n").split("\t")
    if "subject_id" not in header:
        return text, []
    col = header.index("subject_id")
    changes: list[tuple[int, str, str]] = []
    for i in range(index + 1, len(lines)):
        raw = lines[i]
        body = raw.rstrip("\r\n")
        if not body.strip() or body.startswith("#"):
            continue
        cells = body.split("\t")
        if len(cells) != len(header):
            continue  # a malformed row: the loader reports it; renaming leaves it as it is
        curie = cells[col].strip().strip('"')
        prefix, sep, local = curie.partition(":")
        if not sep or local not in ids:
            continue
        renamed = f"{prefix}:{ids[local]}"
        cells[col] = cells[col].replace(curie, renamed)
        lines[i] = "\t".join(cells) + raw[len(body):]
        changes.append((i + 1, curie, renamed))
    return "".join(lines), changes


def load_crosswalks(dir: Path | str | None = None) -> list[Mapping]:
    """All mappings in a folder of `*.sssom.tsv` files (None = the shipped `data/crosswalks/`).

    Raises ValidationErrors listing every malformed row as `path:line: message`.
    """
    root = Path(dir) if dir is not None else paths.crosswalk_dir()
    if not root.exists():
        if dir is None:
            return []
        raise AtlasError(f"{root}: crosswalk folder not found")
    mappings: list[Mapping] = []
    problems: list[Problem] = []
    for file in crosswalk_files(root):
        found, file_problems = read_sssom(file)
        mappings.extend(found)
        problems.extend(file_problems)
    if problems:
        raise ValidationErrors([str(p) for p in problems])
    return mappings


def read_sssom(file: Path) -> tuple[list[Mapping], list[Problem]]:
    """Parse one SSSOM TSV file; returns the good rows and a problem per bad one."""
    shown = str(file)
    text, problem = decode_utf8(shown, file.read_bytes())
    if problem is not None:
        return [], [problem]
    assert text is not None
    lines = text.splitlines()
    meta_lines: list[str] = []
    index = 0
    while index < len(lines) and lines[index].startswith("#"):
        meta_lines.append(lines[index][1:])
        index += 1
    problems: list[Problem] = []
    curie_map: dict[str, str] = {}
    if meta_lines:
        try:
            meta = YAML(typ="safe", pure=True).load("\n".join(meta_lines))
        except YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else 1
            return [], [Problem(shown, line, f"metadata header is not valid YAML: {getattr(exc, 'problem', exc)}")]
        if meta is not None and not isinstance(meta, dict):
            problems.append(Problem(shown, 1, "metadata header must be a YAML mapping (`#curie_map:` ...)"))
        elif meta and meta.get("curie_map") is not None:
            if not isinstance(meta["curie_map"], dict):
                problems.append(Problem(shown, 1, "`curie_map` must map prefixes to IRIs"))
            else:
                curie_map = {str(k): str(v) for k, v in meta["curie_map"].items()}
    while index < len(lines) and not lines[index].strip():
        index += 1
    if index >= len(lines):
        return [], [*problems, Problem(shown, max(index, 1), "no header row; expected tab-separated columns "
                                                             f"{', '.join(REQUIRED_COLUMNS)}")]
    header = lines[index].split("\t")
    header_line = index + 1
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        return [], [*problems, Problem(shown, header_line, f"header lacks column(s) {', '.join(missing)} "
                                                           "(is the file tab-separated?)")]
    prefixes = {**BUILTIN_PREFIXES, **curie_map}
    mappings: list[Mapping] = []
    seen: dict[tuple[str, str, str], int] = {}
    for offset, raw in enumerate(lines[index + 1 :]):
        line = header_line + 1 + offset
        if not raw.strip() or raw.startswith("#"):
            continue
        cells = next(csv.reader([raw], delimiter="\t"))
        if len(cells) != len(header):
            problems.append(Problem(shown, line, f"row has {len(cells)} fields, header has {len(header)} "
                                                 "(tabs inside a value? missing column?)"))
            continue
        row = {k: v.strip() for k, v in zip(header, cells, strict=True)}
        msg = _row_problem(row, prefixes)
        if msg:
            problems.append(Problem(shown, line, msg))
            continue
        key = (row["subject_id"], row["predicate_id"], row["object_id"])
        if key in seen:
            problems.append(Problem(shown, line, f"duplicate mapping (same as line {seen[key]})"))
            continue
        seen[key] = line
        known = {"subject_id", "predicate_id", "object_id", "mapping_justification", "object_label",
                 "subject_label", "confidence", "comment"}
        mappings.append(Mapping(
            subject_id=row["subject_id"], predicate_id=row["predicate_id"], object_id=row["object_id"],
            mapping_justification=row["mapping_justification"], object_label=row.get("object_label", ""),
            subject_label=row.get("subject_label", ""),
            confidence=float(row["confidence"]) if row.get("confidence") else None,
            comment=row.get("comment", ""), extra={k: v for k, v in row.items() if k not in known},
            source_file=shown, line=line,
        ))
    return mappings, problems


def _row_problem(row: dict[str, str], prefixes: dict[str, str]) -> str | None:
    for col in REQUIRED_COLUMNS:
        if not row.get(col):
            return f"empty {col}"
    for col in ("subject_id", "object_id"):
        prefix, sep, local = row[col].partition(":")
        if not sep or not local:
            return f"{col} {brief(row[col])} is not a CURIE (prefix:local)"
        if prefix not in prefixes:
            return f"{col} {brief(row[col])} uses prefix {brief(prefix)} missing from the curie_map"
    if row["predicate_id"] not in PREDICATES:
        close = difflib.get_close_matches(row["predicate_id"], PREDICATES, n=1)
        hint = f" (did you mean {brief(close[0])}?)" if close else ""
        return f"unknown predicate_id {brief(row['predicate_id'])}{hint}; allowed: {', '.join(PREDICATES)}"
    if not row["mapping_justification"].startswith("semapv:"):
        return (f"mapping_justification {brief(row['mapping_justification'])} must be a semapv: term "
                "(e.g. semapv:ManualMappingCuration)")
    if row.get("confidence"):
        try:
            value = float(row["confidence"])
        except ValueError:
            return f"confidence {brief(row['confidence'])} is not a number"
        if not 0.0 <= value <= 1.0:
            return f"confidence {value} is outside [0, 1]"
    return None


def check_crosswalks(taxonomy: Taxonomy, mappings: list[Mapping]) -> list[Problem]:
    """A problem for every mapping whose subject is not a node of `taxonomy`."""
    problems = []
    for m in mappings:
        if m.node_id not in taxonomy.nodes:
            close = difflib.get_close_matches(m.node_id, list(taxonomy.nodes), n=1, cutoff=0.6)
            hint = f" (did you mean {brief(close[0])}?)" if close else ""
            problems.append(Problem(m.source_file or "<crosswalk>", m.line or 1,
                                    f"subject_id {brief(m.subject_id)}: unknown node id {brief(m.node_id)}{hint}"))
    return problems


def nodes_for_external(mappings: list[Mapping], curie: str) -> list[str]:
    """Our node ids mapped to an external category CURIE (file order, no duplicates)."""
    return list(dict.fromkeys(m.node_id for m in mappings if m.object_id == curie))


def externals_for_node(mappings: list[Mapping], node_id: str) -> list[Mapping]:
    """The mappings whose subject is `node_id`."""
    return [m for m in mappings if m.node_id == node_id]
