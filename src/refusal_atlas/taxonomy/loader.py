"""Load a taxonomy directory (or one file) into a `Taxonomy`, collecting every problem.

The user-facing contract: every problem in every file is reported at once, each as
`path:line: message` (1-based line), raised together as `ValidationErrors`; nothing is
half-loaded. Files are read in sorted path order (the order is the node order).

Directory layout: every `*.yaml` / `*.yml` file below the directory is a taxonomy file with a
top-level `nodes:` list and/or a `scheme:` mapping (title, version, namespace, ...), except a
top-level `conditions.yaml`, which is the taxonomy's own condition vocabulary. The vocabulary
is chosen as: the `conditions` argument, else `<dir>/conditions.yaml`, else the shipped
`data/conditions.yaml`.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from refusal_atlas import paths
from refusal_atlas.errors import AtlasError, ValidationErrors
from refusal_atlas.hashing import text_sha256
from refusal_atlas.io import brief, clip
from refusal_atlas.taxonomy.conditions import ConditionVocabulary, load_conditions
from refusal_atlas.taxonomy.model import ID_PATTERN, Behaviour, ConditionRule, Node, Scheme, Status, Taxonomy
from refusal_atlas.taxonomy.validate import validate_taxonomy
from refusal_atlas.taxonomy.yamlio import Problem, item_line, key_line, node_line, read_yaml, value_line

CONDITIONS_FILE = "conditions.yaml"
KIND_PATTERN = re.compile(r"[a-z0-9_]+")  # fullmatch only
TOP_KEYS = ("scheme", "nodes")
NODE_KEYS = ("id", "label", "definition", "broader", "kind", "expect", "conditions", "examples", "status",
             "provenance")
REQUIRED_NODE_KEYS = ("id", "label", "definition")
RULE_KEYS = ("when", "expect", "rationale")
SCHEME_KEYS = tuple(Scheme.model_fields)


def taxonomy_files(path: Path) -> list[Path]:
    """The YAML files that make up a taxonomy at `path` (a directory or a single file), sorted."""
    if path.is_file():
        return [path]
    files = [p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(path).parts)]  # editor/temp files
    return sorted(p for p in files if not (p.parent == path and p.name == CONDITIONS_FILE))


def vocabulary_for(path: Path, conditions: ConditionVocabulary | Path | str | None = None) -> ConditionVocabulary:
    """The condition vocabulary a taxonomy at `path` is checked against (see module docstring)."""
    if isinstance(conditions, ConditionVocabulary):
        return conditions
    if conditions is not None:
        return load_conditions(conditions)
    local = path / CONDITIONS_FILE if path.is_dir() else None
    if local is not None and local.is_file():
        return load_conditions(local)
    return load_conditions(paths.conditions_file())


def load_taxonomy(path: Path | str | None = None, *,
                  conditions: ConditionVocabulary | Path | str | None = None) -> Taxonomy:
    """Load and validate a taxonomy (None = the shipped default in `data/taxonomy/`).

    Raises `ValidationErrors` listing every problem as `path:line: message`.
    """
    root = Path(path) if path is not None else paths.default_taxonomy_dir()
    if not root.exists():
        raise AtlasError(f"{root}: taxonomy not found; pass a directory of YAML files or one YAML file")
    files = taxonomy_files(root)
    if not files:
        raise AtlasError(f"{root}: no *.yaml files found; a taxonomy is a directory of YAML files with `nodes:`")
    vocab = vocabulary_for(root, conditions)
    taxonomy, problems, unparsed = parse_files(files, vocab)
    problems.extend(validate_taxonomy(taxonomy, unparsed_ids=unparsed))
    if problems:
        raise ValidationErrors([str(p) for p in _ordered(problems, files)])
    return taxonomy


def _ordered(problems: list[Problem], files: list[Path]) -> list[Problem]:
    """Problems grouped by file (in load order), then by line; duplicates removed."""
    rank = {str(f): i for i, f in enumerate(files)}
    unique = list(dict.fromkeys(problems))
    return sorted(unique, key=lambda p: (rank.get(p.path, len(rank)), p.line, p.message))


def parse_files(files: list[Path], vocab: ConditionVocabulary | None = None
                ) -> tuple[Taxonomy, list[Problem], frozenset[str]]:
    """Read every file into one Taxonomy; per-node and per-file problems are returned, not raised.

    Also returns the ids of nodes that failed to parse. Cross-node checks (parents, cycles)
    are `validate.validate_taxonomy`'s job.
    """
    problems: list[Problem] = []
    unparsed: set[str] = set()
    first_seen: dict[str, str] = {}
    nodes: dict[str, Node] = {}
    scheme: Scheme | None = None
    scheme_at: str | None = None
    for file in files:
        shown = str(file)
        data, file_problems = read_yaml(file, shown)
        problems.extend(file_problems)
        if data is None:
            continue
        if not isinstance(data, dict):
            problems.append(Problem(shown, node_line(data), "top level must be a mapping with `nodes:` "
                                                            f"(and optionally `scheme:`), not a {_type_name(data)}"))
            continue
        for key in data:
            if key not in TOP_KEYS:
                problems.append(Problem(shown, key_line(data, key),
                                        f"unknown top-level key {brief(key)}{_suggest(key, TOP_KEYS)}; "
                                        "allowed: scheme, nodes"))
        if "scheme" in data:
            line = key_line(data, "scheme")
            if scheme_at is not None:
                problems.append(Problem(shown, line, f"second `scheme:` (first at {scheme_at}); keep one scheme file"))
            else:
                parsed = _parse_scheme(shown, data["scheme"], line, problems)
                if parsed is not None:
                    scheme, scheme_at = parsed, f"{shown}:{line}"
        if "nodes" not in data:
            if "scheme" not in data:
                problems.append(Problem(shown, node_line(data), "missing top-level `nodes:` list"))
            continue
        raw_nodes = data["nodes"]
        if raw_nodes is None:
            continue  # `nodes:` with nothing under it: an intentionally empty file
        if not isinstance(raw_nodes, list):
            problems.append(Problem(shown, value_line(data, "nodes"),
                                    f"`nodes` must be a list of nodes (`- id: ...`), not a {_type_name(raw_nodes)}"))
            continue
        for index, raw in enumerate(raw_nodes):
            line = item_line(raw_nodes, index, key_line(data, "nodes"))
            raw_id = str(raw["id"]) if isinstance(raw, dict) and isinstance(raw.get("id"), str) else None
            if raw_id is not None and raw_id in first_seen:
                problems.append(Problem(shown, line, f"duplicate id {brief(raw_id)} (first defined at "
                                                     f"{first_seen[raw_id]}); ids must be unique across all files"))
                continue
            if raw_id is not None:
                first_seen[raw_id] = f"{shown}:{line}"
            node = parse_node(shown, raw, line, problems, vocab)
            if node is None:
                if raw_id is not None:
                    unparsed.add(raw_id)
                continue
            nodes[node.id] = node
    return Taxonomy(scheme=scheme or Scheme(), nodes=nodes), problems, frozenset(unparsed)


def _parse_scheme(shown: str, raw: Any, line: int, problems: list[Problem]) -> Scheme | None:
    if not isinstance(raw, dict):
        problems.append(Problem(shown, line, f"`scheme` must be a mapping ({', '.join(SCHEME_KEYS)})"))
        return None
    ok = True
    for key, value in raw.items():
        kline = key_line(raw, key, line)
        if key not in SCHEME_KEYS:
            problems.append(Problem(shown, kline, f"unknown scheme key {brief(key)}{_suggest(key, SCHEME_KEYS)}; "
                                                  f"allowed: {', '.join(SCHEME_KEYS)}"))
            ok = False
        elif not isinstance(value, str):
            problems.append(Problem(shown, kline, f"scheme key {brief(key)} must be a string, not a {_type_name(value)}"
                                                  + (" (quote it, e.g. \"1.0\")" if key == "version" else "")))
            ok = False
    if not ok:
        return None
    return Scheme(**{str(k): str(v) for k, v in raw.items()})


def parse_node(shown: str, raw: Any, line: int, problems: list[Problem],
               vocab: ConditionVocabulary | None = None) -> Node | None:
    """Check one raw node mapping key by key; return a Node, or None after recording problems."""
    if not isinstance(raw, dict):
        problems.append(Problem(shown, line, f"each node must be a mapping (`- id: ...`), not a {_type_name(raw)}"))
        return None
    start = len(problems)
    label = raw.get("id") if isinstance(raw.get("id"), str) else f"at line {line}"
    where = f"node {brief(label)}" if "id" in raw and isinstance(raw.get("id"), str) else f"node {label}"
    for key in raw:
        if key not in NODE_KEYS:
            problems.append(Problem(shown, key_line(raw, key, line),
                                    f"unknown key {brief(key)} in {where}{_suggest(str(key), NODE_KEYS)}; "
                                    f"allowed: {', '.join(NODE_KEYS)}"))
    for key in REQUIRED_NODE_KEYS:
        if key not in raw or raw[key] is None:
            problems.append(Problem(shown, line, f"{where} is missing required key {brief(key)}"))
    for key in ("id", "label", "definition", "kind", "provenance"):
        if key in raw and raw[key] is not None and not isinstance(raw[key], str):
            problems.append(Problem(shown, value_line(raw, key, line),
                                    f"{where}: {brief(key)} must be a string, not a {_type_name(raw[key])}"))
        elif key in REQUIRED_NODE_KEYS and isinstance(raw.get(key), str) and not raw[key].strip():
            problems.append(Problem(shown, value_line(raw, key, line), f"{where}: {brief(key)} must not be empty"))
    node_id = raw.get("id")
    if isinstance(node_id, str) and node_id.strip():
        msg = id_problem(node_id)
        if msg:
            problems.append(Problem(shown, value_line(raw, "id", line), msg))
    kind = raw.get("kind")
    if isinstance(kind, str) and not KIND_PATTERN.fullmatch(kind):
        problems.append(Problem(shown, value_line(raw, "kind", line),
                                f"{where}: kind {brief(kind)} must be a slug of a-z, 0-9 and '_' "
                                "(e.g. capability_uplift, intent_to_harm, vulnerable_target)"))
    for key in ("broader", "examples"):
        if key in raw and raw[key] is not None:
            value = raw[key]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                hint = "a list of parent ids, e.g. [weapons]" if key == "broader" else "a list of strings"
                problems.append(Problem(shown, value_line(raw, key, line),
                                        f"{where}: {brief(key)} must be {hint}, not {_describe(value)}"))
    if "expect" in raw and raw["expect"] is not None:
        msg = behaviour_problem(raw["expect"])
        if msg:
            problems.append(Problem(shown, value_line(raw, "expect", line), f"{where}: {msg}"))
    if "status" in raw and raw["status"] is not None:
        status = raw["status"]
        allowed = [s.value for s in Status]
        if not isinstance(status, str) or status not in allowed:
            problems.append(Problem(shown, value_line(raw, "status", line),
                                    f"{where}: unknown status {brief(status)}{_suggest(str(status), allowed)}; "
                                    f"allowed: {', '.join(allowed)}"))
    rules = _parse_rules(shown, raw, line, where, problems, vocab)
    if len(problems) > start:
        return None
    data = {k: v for k, v in raw.items() if v is not None and k != "conditions"}
    data = {k: ([str(x) for x in v] if isinstance(v, list) else str(v)) for k, v in data.items()}
    try:
        return Node(**data, conditions=rules or [], source_file=shown, source_line=line)
    except ValidationError as exc:  # anything the checks above missed, still located
        for err in exc.errors():
            loc = err["loc"][0] if err["loc"] else None
            at = value_line(raw, str(loc), line) if loc is not None else line
            problems.append(Problem(shown, at, f"{where}: {'.'.join(map(str, err['loc']))}: {err['msg']}"))
        return None


def _parse_rules(shown: str, raw: dict, line: int, where: str, problems: list[Problem],
                 vocab: ConditionVocabulary | None) -> list[ConditionRule] | None:
    if "conditions" not in raw or raw["conditions"] is None:
        return []
    rules_raw = raw["conditions"]
    if not isinstance(rules_raw, list):
        problems.append(Problem(shown, value_line(raw, "conditions", line),
                                f"{where}: 'conditions' must be a list of rules (`- when: {{dim: value}}` + `expect`)"
                                f", not {_describe(rules_raw)}"))
        return None
    rules: list[ConditionRule] = []
    seen: dict[tuple, int] = {}
    ok = True
    for i, rule in enumerate(rules_raw):
        rline = item_line(rules_raw, i, line)
        if not isinstance(rule, dict):
            problems.append(Problem(shown, rline, f"{where}: each condition must be a mapping with `when` and "
                                                  f"`expect`, not {_describe(rule)}"))
            ok = False
            continue
        n_before = len(problems)
        for key in rule:
            if key not in RULE_KEYS:
                problems.append(Problem(shown, key_line(rule, key, rline),
                                        f"{where}: unknown key {brief(key)} in condition"
                                        f"{_suggest(str(key), RULE_KEYS)}; "
                                        f"allowed: {', '.join(RULE_KEYS)}"))
        for key in ("when", "expect"):
            if key not in rule or rule[key] is None:
                problems.append(Problem(shown, rline, f"{where}: condition is missing required key {brief(key)}"))
        when = rule.get("when")
        if when is not None:
            if not isinstance(when, dict) or not when:
                problems.append(Problem(shown, value_line(rule, "when", rline),
                                        f"{where}: `when` must be a non-empty mapping of dimension: value, "
                                        f"not {_describe(when)}"))
            else:
                for dim, value in when.items():
                    vline = key_line(when, dim, rline)
                    if not isinstance(dim, str) or not isinstance(value, str):
                        problems.append(Problem(shown, vline, f"{where}: condition `{clip(dim)}: {clip(value)}` "
                                                              "must map a dimension name to a value name "
                                                              "(both strings)"))
                        continue
                    if vocab is not None:
                        msg = vocab.problem(dim, value)
                        if msg:
                            problems.append(Problem(shown, vline, f"{where}: {msg}"))
        if rule.get("expect") is not None:
            msg = behaviour_problem(rule["expect"])
            if msg:
                problems.append(Problem(shown, value_line(rule, "expect", rline), f"{where}: {msg}"))
        if "rationale" in rule and rule["rationale"] is not None and not isinstance(rule["rationale"], str):
            problems.append(Problem(shown, value_line(rule, "rationale", rline),
                                    f"{where}: condition 'rationale' must be a string"))
        if len(problems) > n_before or not isinstance(when, dict):
            ok = False
            continue
        key = tuple(sorted((str(k), str(v)) for k, v in when.items()))
        if key in seen:
            problems.append(Problem(shown, rline, f"{where}: a second condition with the same `when` "
                                                  f"{dict(key)} (first at line {seen[key]}); merge them"))
            ok = False
            continue
        seen[key] = rline
        rules.append(ConditionRule(when={str(k): str(v) for k, v in when.items()}, expect=Behaviour(rule["expect"]),
                                   rationale=rule.get("rationale")))
    return rules if ok else None


def id_problem(node_id: str) -> str | None:
    """A one-line message if `node_id` is not a valid id, else None."""
    if "/" in node_id or ".." in node_id or "\\" in node_id:
        return (f"id {brief(node_id)} must not contain '/', '\\' or '..' (ids become file names and IRIs); "
                "use a-z, 0-9, '_', '.', '-'")
    if not ID_PATTERN.fullmatch(node_id):
        return (f"id {brief(node_id)} may contain only lower-case a-z, 0-9, '_', '.', '-' "
                "(and must not start with '.' or '-')")
    return None


def behaviour_problem(value: Any) -> str | None:
    """A one-line message if `value` is not a Behaviour, else None."""
    allowed = [b.value for b in Behaviour]
    if isinstance(value, str) and value in allowed:
        return None
    return f"unknown behaviour {brief(value)}{_suggest(str(value), allowed)}; allowed: {', '.join(allowed)}"


def _suggest(word: str, choices: Any) -> str:
    if len(word) > 100:  # no close match is that long; difflib's cost grows with the length
        return ""
    norm = word.replace("-", "_").lower()
    close = difflib.get_close_matches(norm, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {brief(close[0])}?)" if close else ""


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list):
        return "list"
    return type(value).__name__


def _describe(value: Any) -> str:
    if isinstance(value, list):
        bad = [v for v in value if not isinstance(v, str)]
        if bad:
            return f"a list containing a {_type_name(bad[0])}"
        return "a list"
    return f"a {_type_name(value)}"


def taxonomy_hash(taxonomy: Taxonomy) -> str:
    """A stable sha256 of the taxonomy's content (scheme + nodes by id), for downstream caches.

    File layout, comments, key order and node order do not change it; any field value does.
    """
    payload = {
        "scheme": taxonomy.scheme.model_dump(mode="json"),
        "nodes": {nid: taxonomy.nodes[nid].to_yaml_dict() for nid in sorted(taxonomy.nodes)},
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return text_sha256(blob)
