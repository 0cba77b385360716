"""Write a Taxonomy back to the YAML directory layout, keeping an existing layout where it can.

Why this is more than `yaml.dump`: users edit the YAML by hand, with comments and their own
file split. When a taxonomy comes back from RDF, every node that already exists in `existing_dir`
is updated in place (unchanged keys keep their comments and formatting; a key's comment survives
when only its value changes), deleted nodes are removed, and new nodes go into their first
parent's file (a new root gets a file of its own). Every file is written atomically.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq

from refusal_atlas.errors import AtlasError
from refusal_atlas.io import atomic_write_text, file_lock, write_text_like
from refusal_atlas.taxonomy.edit import lock_path
from refusal_atlas.taxonomy.loader import CONDITIONS_FILE, NODE_KEYS, taxonomy_files
from refusal_atlas.taxonomy.model import Scheme, Taxonomy
from refusal_atlas.taxonomy.yamlio import dump_to_text, load_for_edit, round_trip_yaml

SCHEME_FILE = "00-scheme.yaml"


def write_taxonomy_yaml(tax: Taxonomy, out_dir: Path | str, existing_dir: Path | str | None = None) -> list[Path]:
    """Write `tax` as a taxonomy directory at `out_dir`; returns the files written.

    With `existing_dir` (which may be `out_dir` itself) its files, comments and node placement
    are kept. A non-empty `out_dir` that is not `existing_dir` is refused, so stale files can
    never be merged into the result. Holds the taxonomy edit lock, like `taxonomy propose`.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(lock_path(out)):
        return _write_layout(tax, out, existing_dir)


def _write_layout(tax: Taxonomy, out_dir: Path, existing_dir: Path | str | None) -> list[Path]:
    out = Path(out_dir)
    existing = Path(existing_dir) if existing_dir is not None else None
    if existing is not None and not existing.is_dir():
        raise AtlasError(f"{existing}: --existing must be a taxonomy directory")
    same = existing is not None and out.exists() and out.resolve() == existing.resolve()
    if out.exists() and not out.is_dir():
        raise AtlasError(f"{out}: output must be a directory")
    if out.is_dir() and not same and taxonomy_files(out):
        raise AtlasError(f"{out}: already holds taxonomy YAML files; pass `--existing {out}` to update it in "
                         "place, or choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)

    docs: dict[str, Any] = {}  # relative path -> ruamel document
    yamls: dict[str, Any] = {}
    placed: dict[str, str] = {}  # node id -> relative path
    if existing is not None:
        for path in taxonomy_files(existing):
            rel = path.relative_to(existing).as_posix()
            data, yaml = load_for_edit(path)
            if not isinstance(data, CommentedMap):
                raise AtlasError(f"{path}: top level is not a mapping; fix it with `refusal-atlas taxonomy "
                                 "validate` first")
            docs[rel], yamls[rel] = data, yaml
            _update_nodes(data, tax, placed, rel)

    _update_scheme(docs, tax.scheme)
    _place_new_nodes(tax, docs, placed)

    written: list[Path] = []
    for rel, data in docs.items():
        target = out / rel
        nodes = data.get("nodes")
        if not data.get("scheme") and not nodes:
            if same and target.exists():
                target.unlink()  # every node of the file was deleted
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        text = dump_to_text(yamls.get(rel) or _new_yaml(), data)
        # an updated file keeps its BOM and line endings; a new one is plain UTF-8 with LF
        write_text_like(target, text) if target.is_file() else atomic_write_text(target, text)
        written.append(target)
    if existing is not None and not same and (existing / CONDITIONS_FILE).is_file():
        shutil.copyfile(existing / CONDITIONS_FILE, out / CONDITIONS_FILE)
    return written


def _new_yaml() -> Any:
    yaml = round_trip_yaml()
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def plain(value: Any) -> Any:
    """ruamel containers and scalar strings as plain Python data (for comparisons)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, str):
        return str(value)
    return value


def _update_nodes(data: CommentedMap, tax: Taxonomy, placed: dict[str, str], rel: str) -> None:
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list):
        return
    for index in reversed(range(len(raw_nodes))):
        raw = raw_nodes[index]
        node_id = raw.get("id") if isinstance(raw, dict) else None
        if not isinstance(node_id, str) or node_id not in tax.nodes or node_id in placed:
            del raw_nodes[index]
            continue
        placed[node_id] = rel
        merge_mapping(raw, tax.nodes[node_id].to_yaml_dict(), NODE_KEYS)


def merge_mapping(target: CommentedMap, new: dict[str, Any], key_order: tuple[str, ...]) -> None:
    """Make `target` equal to `new` in place: unchanged values (and their comments) stay untouched."""
    for key in [k for k in target if k not in new]:
        del target[key]
    for key, value in new.items():
        if key in target:
            if plain(target[key]) != value:
                target[key] = _styled(key, value)
            continue
        rank = key_order.index(key) if key in key_order else len(key_order)
        position = sum(1 for k in target if (key_order.index(k) if k in key_order else len(key_order)) < rank)
        target.insert(position, key, _styled(key, value))


def _styled(key: str, value: Any) -> Any:
    """New values in the shipped files' style: `broader` and `when` in flow style, the rest block."""
    if key == "broader" and isinstance(value, list):
        seq = CommentedSeq(value)
        seq.fa.set_flow_style()
        return seq
    if key == "conditions" and isinstance(value, list):
        rules = CommentedSeq()
        for rule in value:
            item = CommentedMap()
            for rk, rv in rule.items():
                if rk == "when":
                    when = CommentedMap(rv)
                    when.fa.set_flow_style()
                    item[rk] = when
                else:
                    item[rk] = rv
            rules.append(item)
        return rules
    return value


def _update_scheme(docs: dict[str, Any], scheme: Scheme) -> None:
    """Update the scheme mapping in place; keys a file leaves at their default stay left out."""
    values = {k: v for k, v in scheme.model_dump(mode="json").items() if v is not None}
    defaults = Scheme().model_dump(mode="json")
    for data in docs.values():
        current = data.get("scheme")
        if isinstance(current, CommentedMap):
            new = {k: v for k, v in values.items() if k in current or v != defaults.get(k)}
            merge_mapping(current, new, tuple(Scheme.model_fields))
            return
    doc = CommentedMap()
    doc["scheme"] = CommentedMap(values)
    docs_items = list(docs.items())
    docs.clear()
    docs[SCHEME_FILE] = doc  # first, as the loader reads files in sorted order
    docs.update({k: v for k, v in docs_items if k != SCHEME_FILE})


def _place_new_nodes(tax: Taxonomy, docs: dict[str, Any], placed: dict[str, str]) -> None:
    pending = [nid for nid in tax.nodes if nid not in placed]
    while pending:
        progress = False
        for nid in list(pending):
            parents = [p for p in tax.nodes[nid].broader if p in tax.nodes]
            target = next((placed[p] for p in parents if p in placed), None)
            if target is None and parents and any(p in pending for p in parents):
                continue  # wait until a parent is placed
            if target is None:
                target = _new_file(docs, nid)
            _append_node(docs[target], tax.nodes[nid].to_yaml_dict())
            placed[nid] = target
            pending.remove(nid)
            progress = True
        if not progress:  # parents only in a cycle: give the first its own file and go on
            nid = pending.pop(0)
            target = _new_file(docs, nid)
            _append_node(docs[target], tax.nodes[nid].to_yaml_dict())
            placed[nid] = target


def _new_file(docs: dict[str, Any], root_id: str) -> str:
    numbers = [int(m.group(1)) for rel in docs if (m := re.match(r"(\d+)-", Path(rel).name))]
    number = max(numbers, default=0) + 1
    slug = re.sub(r"[^a-z0-9_-]+", "-", root_id.lower()).strip("-")[:60] or "nodes"
    rel = f"{number:02d}-{slug}.yaml"
    while rel in docs:
        number += 1
        rel = f"{number:02d}-{slug}.yaml"
    doc = CommentedMap()
    doc["nodes"] = CommentedSeq()
    docs[rel] = doc
    return rel


def _append_node(doc: CommentedMap, node: dict[str, Any]) -> None:
    if not isinstance(doc.get("nodes"), list):
        doc["nodes"] = CommentedSeq()
    item = CommentedMap()
    merge_mapping(item, node, NODE_KEYS)
    doc["nodes"].append(item)
