"""Edit a taxonomy's YAML files in place: propose, accept, deprecate, move.

Edits go through ruamel.yaml's round-trip mode so the file keeps its comments, key order,
quoting and indentation; only the touched node changes. Every edit first loads and validates
the whole taxonomy (an edit never starts from, or produces, an invalid taxonomy) and writes
with a temporary file + `os.replace`, so a failure leaves the original file untouched.

The shipped default taxonomy is package data and is never edited: copy it first
(`refusal-atlas taxonomy init DIR`, or `copy_default(dest)`), then edit the copy.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq

from refusal_atlas import paths
from refusal_atlas.errors import AtlasError, ValidationErrors
from refusal_atlas.io import brief, file_lock
from refusal_atlas.taxonomy.conditions import ConditionVocabulary, parse_rule
from refusal_atlas.taxonomy.crosswalk import LOCAL_DIR as CROSSWALK_DIR
from refusal_atlas.taxonomy.crosswalk import crosswalk_files
from refusal_atlas.taxonomy.loader import (
    CONDITIONS_FILE,
    behaviour_problem,
    id_problem,
    load_taxonomy,
    taxonomy_files,
    vocabulary_for,
)
from refusal_atlas.taxonomy.model import Behaviour, ConditionRule, Node, Status, Taxonomy
from refusal_atlas.taxonomy.placeholders import acceptance_problem
from refusal_atlas.taxonomy.validate import validate_taxonomy
from refusal_atlas.taxonomy.yamlio import load_for_edit, write_edited

LOCK_NAME = ".refusal-atlas-lock"


def is_default_taxonomy(directory: Path) -> bool:
    try:
        return Path(directory).resolve() == paths.default_taxonomy_dir().resolve()
    except FileNotFoundError:
        return False


def is_package_data(path: Path | str) -> bool:
    """Whether `path` (a folder or a file, after following links) lies inside the shipped data folder."""
    resolved = Path(path).resolve()
    for shipped in (paths.default_taxonomy_dir, paths.data_dir):
        try:
            if resolved.is_relative_to(shipped().resolve()):
                return True
        except FileNotFoundError:
            continue
    return False


def _refuse_package_data(path: Path, allow_default: bool) -> None:
    if not allow_default and is_package_data(path):
        raise AtlasError(f"{path}: this is the shipped default taxonomy (package data) and is not edited in place; "
                         "copy it with `refusal-atlas taxonomy init DIR` and pass --taxonomy DIR")


def _editable(directory: Path | str, allow_default: bool) -> Path:
    root = Path(directory)
    _refuse_package_data(root, allow_default)
    if not root.exists():
        raise AtlasError(f"{root}: taxonomy not found")
    return root


def lock_path(root: Path) -> Path:
    """The lock file that serialises edits of the taxonomy at `root`: beside the folder or file.

    Beside rather than inside, so the taxonomy folder holds only the user's files; a parent the
    user cannot write (a taxonomy at a mount point) falls back to inside the folder.
    """
    resolved = root.resolve()
    beside = resolved.parent / f".{resolved.name}.refusal-atlas-lock"
    if resolved.is_dir() and not os.access(resolved.parent, os.W_OK):
        return resolved / LOCK_NAME
    return beside


def _write(path: Path, yaml: Any, data: Any, allow_default: bool) -> None:
    # a link or a single file inside a user's folder may still point into the package data
    _refuse_package_data(path, allow_default)
    write_edited(path, yaml, data)


def copy_default(dest: Path | str) -> Path:
    """Copy the shipped taxonomy, its condition vocabulary and its crosswalks (`dest/crosswalks/`) for editing.

    The crosswalks travel with the copy because their subjects are its node ids: `ontology export`,
    `taxonomy validate` and `taxonomy rename` find them there.
    """
    target = Path(dest)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise AtlasError(f"{target}: already exists and is not empty (or is a file); choose a new folder")
    try:
        shutil.copytree(paths.default_taxonomy_dir(), target, dirs_exist_ok=True)
        if paths.conditions_file().is_file() and not (target / CONDITIONS_FILE).exists():
            shutil.copy2(paths.conditions_file(), target / CONDITIONS_FILE)
        shipped = crosswalk_files(paths.crosswalk_dir()) if paths.crosswalk_dir().is_dir() else []
        if shipped:
            (target / CROSSWALK_DIR).mkdir(exist_ok=True)
        for file in shipped:
            shutil.copy2(file, target / CROSSWALK_DIR / file.name)
    except (shutil.Error, OSError) as exc:
        raise AtlasError(f"{target}: cannot copy the taxonomy here ({exc}); choose a writable folder") from exc
    # package data may be installed read-only; the copy is for editing
    for f in [target, *target.rglob("*")]:
        f.chmod(f.stat().st_mode | 0o200)
    return target


def propose(
    directory: Path | str,
    node_id: str,
    parent: str | Sequence[str] | None,
    label: str,
    definition: str,
    expect: Behaviour | str | None = None,
    conditions: Iterable[ConditionRule | str] = (),
    examples: Iterable[str] = (),
    *,
    kind: str | None = None,
    vocabulary: ConditionVocabulary | Path | str | None = None,
    file: Path | str | None = None,
    allow_default: bool = False,
) -> Node:
    """Add a node with status `proposed` to its (first) parent's file, after the parent's subtree.

    `conditions` are ConditionRules or strings `"dim=value,dim=value:behaviour"`. A root
    (no parent) goes into `file`, or the last node file. Returns the node as written.
    """
    root = _editable(directory, allow_default)
    with file_lock(lock_path(root)):
        vocab = vocabulary_for(root, vocabulary)
        taxonomy = load_taxonomy(root, conditions=vocab)
        parents = [parent] if isinstance(parent, str) else list(parent or [])
        problems = []
        msg = id_problem(node_id)
        if msg:
            problems.append(msg)
        if node_id in taxonomy.nodes:
            other = taxonomy.nodes[node_id]
            problems.append(f"id {brief(node_id)} already exists ({other.source_file}:{other.source_line}); "
                            "choose a new id")
        for p in parents:
            if p not in taxonomy.nodes:
                problems.append(f"unknown parent {brief(p)}")
        if expect is not None:
            msg = behaviour_problem(str(expect.value if isinstance(expect, Behaviour) else expect))
            if msg:
                problems.append(msg)
        rules: list[ConditionRule] = []
        for rule in conditions:
            parsed = parse_rule(rule) if isinstance(rule, str) else rule
            for dim, value in parsed.when.items():
                msg = vocab.problem(dim, value)
                if msg:
                    problems.append(msg)
            rules.append(parsed)
        if not label.strip() or not definition.strip():
            problems.append("label and definition must not be empty")
        if problems:
            raise AtlasError(f"cannot propose {brief(node_id)}: " + "; ".join(problems))
        node = Node(id=node_id, label=label, definition=definition, broader=parents, kind=kind,
                    expect=Behaviour(expect) if expect is not None else None, conditions=rules,
                    examples=list(examples), status=Status.PROPOSED)
        _check_with(taxonomy, node, vocab)

        target = Path(taxonomy.nodes[parents[0]].source_file or "") if parents else _root_file(root, file)
        data, yaml = load_for_edit(target)
        seq = _nodes_seq(data, target)
        position = _insert_position(seq, taxonomy, parents[0] if parents else None)
        seq.insert(position, _node_map(node))
        if position > 0:
            _move_trailing_comment(seq, position - 1, position)
        _write(target, yaml, data, allow_default)
        return node.model_copy(update={"source_file": str(target)})


def accept(directory: Path | str, node_id: str, *, allow_default: bool = False,
           vocabulary: ConditionVocabulary | Path | str | None = None, allow_root: bool = False) -> Node:
    """Mark a node accepted; refused while it holds template text or lacks an accepted parent (see placeholders)."""
    return set_status(directory, node_id, Status.ACCEPTED, allow_default=allow_default, vocabulary=vocabulary,
                      allow_root=allow_root)


def deprecate(directory: Path | str, node_id: str, *, allow_default: bool = False,
              vocabulary: ConditionVocabulary | Path | str | None = None) -> Node:
    """Mark a node deprecated (kept in the files so ids stay stable; children keep inheriting)."""
    return set_status(directory, node_id, Status.DEPRECATED, allow_default=allow_default, vocabulary=vocabulary)


def set_status(directory: Path | str, node_id: str, status: Status, *, allow_default: bool = False,
               vocabulary: ConditionVocabulary | Path | str | None = None, allow_root: bool = False) -> Node:
    """Set a node's `status` key in place (inserted after `id` when absent)."""
    root = _editable(directory, allow_default)
    with file_lock(lock_path(root)):
        taxonomy = load_taxonomy(root, conditions=vocabulary_for(root, vocabulary))
        node = _existing(taxonomy, node_id)
        if node.status is status:
            return node
        problem = acceptance_problem(taxonomy, node, allow_root=allow_root) if status is Status.ACCEPTED else None
        if problem:
            raise AtlasError(problem)
        path = Path(node.source_file or "")
        data, yaml = load_for_edit(path)
        item = _find_item(data, path, node_id)
        if "status" in item:
            item["status"] = status.value
        else:
            item.insert(1, "status", status.value)
        _write(path, yaml, data, allow_default)
        return node.model_copy(update={"status": status})


def move(directory: Path | str, node_id: str, new_parent: str | Sequence[str] | None, *,
         allow_default: bool = False, vocabulary: ConditionVocabulary | Path | str | None = None) -> Node:
    """Give a node new parents (None = make it a root); refuses to create a cycle."""
    root = _editable(directory, allow_default)
    with file_lock(lock_path(root)):
        vocab = vocabulary_for(root, vocabulary)
        taxonomy = load_taxonomy(root, conditions=vocab)
        node = _existing(taxonomy, node_id)
        parents = [new_parent] if isinstance(new_parent, str) else list(new_parent or [])
        descendants = set(taxonomy.descendants(node_id))
        for p in parents:
            if p not in taxonomy.nodes:
                raise AtlasError(f"cannot move {brief(node_id)}: unknown parent {brief(p)}")
            if p == node_id or p in descendants:
                raise AtlasError(f"cannot move {brief(node_id)} under {brief(p)}: {brief(p)} is {brief(node_id)} "
                                 "or one of its "
                                 "descendants, which would make a cycle")
        moved = node.model_copy(update={"broader": parents})
        _check_with(taxonomy, moved, vocab, replace=True)
        path = Path(node.source_file or "")
        data, yaml = load_for_edit(path)
        item = _find_item(data, path, node_id)
        if not parents:
            if "broader" in item:
                _delete_key(item, "broader")
        else:
            new = CommentedSeq(parents)
            old = item.get("broader")
            if not isinstance(old, CommentedSeq) or old.fa.flow_style():
                new.fa.set_flow_style()
            if "broader" in item:
                _replace_value(item, "broader", new)
            else:
                keys = list(item)
                item.insert(keys.index("definition") + 1 if "definition" in keys else len(keys), "broader", new)
                if list(item)[-1] == "broader":
                    _move_trailing_key_comment(item, keys[-1], "broader")
        _write(path, yaml, data, allow_default)
        return moved


# --- helpers ---------------------------------------------------------------------------------


def _existing(taxonomy: Taxonomy, node_id: str) -> Node:
    if node_id not in taxonomy.nodes:
        raise AtlasError(f"unknown node id {brief(node_id)}; `refusal-atlas taxonomy show` lists the ids")
    return taxonomy.nodes[node_id]


def _check_with(taxonomy: Taxonomy, node: Node, vocab: ConditionVocabulary, replace: bool = False) -> None:
    """Validate the taxonomy as it would be after the edit; refuse the edit if it breaks anything."""
    nodes = dict(taxonomy.nodes)
    nodes[node.id] = node
    candidate = Taxonomy(scheme=taxonomy.scheme, nodes=nodes)
    problems = validate_taxonomy(candidate, vocab)
    if problems:
        raise ValidationErrors([str(p) for p in problems])


def _root_file(root: Path, file: Path | str | None) -> Path:
    if file is not None:
        path = Path(file) if Path(file).is_absolute() or Path(file).exists() else root / file
        if not path.is_file():
            raise AtlasError(f"{path}: file not found; a new root node goes into an existing taxonomy file")
        return path
    candidates = []
    for f in taxonomy_files(root):
        data, _ = load_for_edit(f)
        if isinstance(data, dict) and "nodes" in data:
            candidates.append(f)
    if not candidates:
        raise AtlasError(f"{root}: no file with `nodes:` to add a root node to")
    return candidates[-1]


def _nodes_seq(data: Any, path: Path) -> CommentedSeq:
    if not isinstance(data, CommentedMap):
        raise AtlasError(f"{path}:1: top level must be a mapping with `nodes:`")
    if data.get("nodes") is None:
        data["nodes"] = CommentedSeq()
    seq = data["nodes"]
    if not isinstance(seq, CommentedSeq):
        raise AtlasError(f"{path}:1: `nodes` must be a list")
    return seq


def _find_item(data: Any, path: Path, node_id: str) -> CommentedMap:
    for item in _nodes_seq(data, path):
        if isinstance(item, CommentedMap) and item.get("id") == node_id:
            return item
    raise AtlasError(f"{path}: node {brief(node_id)} not found in the file (was it edited meanwhile?)")


def _insert_position(seq: CommentedSeq, taxonomy: Taxonomy, parent: str | None) -> int:
    """Just after the last node of the parent's subtree in this file (else at the end)."""
    if parent is None:
        return len(seq)
    family = {parent, *taxonomy.descendants(parent)}
    last = None
    for i, item in enumerate(seq):
        if isinstance(item, CommentedMap) and item.get("id") in family:
            last = i
    return len(seq) if last is None else last + 1


def _node_map(node: Node) -> CommentedMap:
    """The node as a round-trip mapping: status right after id, flow-style `broader` and `when`."""
    plain = node.to_yaml_dict()
    out = CommentedMap()
    out["id"] = plain.pop("id")
    out["status"] = node.status.value
    plain.pop("status", None)
    for key, value in plain.items():
        if key == "broader":
            seq = CommentedSeq(value)
            seq.fa.set_flow_style()
            out[key] = seq
        elif key == "conditions":
            rules = CommentedSeq()
            for rule in value:
                rm = CommentedMap()
                when = CommentedMap(rule["when"])
                when.fa.set_flow_style()
                rm["when"] = when
                rm["expect"] = rule["expect"]
                if rule.get("rationale"):
                    rm["rationale"] = rule["rationale"]
                rules.append(rm)
            out[key] = rules
        elif key == "examples":
            out[key] = CommentedSeq(value)
        else:
            out[key] = value
    return out


# Comments after the last key of a YAML item are stored on that item's deepest last element;
# when an edit puts something after it, the comment (which introduces the *next* item) has to move
# along, or it would end up above the new content.

def _pop_trailing(obj: Any) -> Any:
    """Detach and return the comment token after `obj`'s last element, keeping an inline comment."""
    if isinstance(obj, CommentedMap) and len(obj):
        last: Any = list(obj)[-1]
        slot = 2
    elif isinstance(obj, CommentedSeq) and len(obj):
        last = len(obj) - 1
        slot = 0
    else:
        return None
    value = obj[last]
    if isinstance(value, CommentedMap | CommentedSeq) and not value.fa.flow_style():
        found = _pop_trailing(value)
        if found is not None:
            return found
    entry = obj.ca.items.get(last)
    if not entry or entry[slot] is None:
        return None
    token = entry[slot]
    text = token.value
    cut = text.find("\n")
    keep, rest = (text[: cut + 1], text[cut + 1 :]) if cut >= 0 else (text, "")
    if not rest.strip():
        return None
    if keep.strip():
        token.value = keep
    else:
        entry[slot] = None
    moved = copy.copy(token)
    moved.value = "\n" + rest
    return moved


def _attach_trailing(obj: Any, key: Any, token: Any) -> None:
    """Put `token` after the value of `obj[key]` (on its deepest last element for block values)."""
    value = obj[key]
    if isinstance(value, CommentedMap | CommentedSeq) and not value.fa.flow_style() and len(value):
        inner = list(value)[-1] if isinstance(value, CommentedMap) else len(value) - 1
        _attach_trailing(value, inner, token)
        return
    slot = 2 if isinstance(obj, CommentedMap) else 0
    entry = obj.ca.items.setdefault(key, [None, None, None, None])
    if entry[slot] is None:
        entry[slot] = token
    else:
        entry[slot].value = entry[slot].value.rstrip("\n") + token.value


def _move_trailing_comment(seq: CommentedSeq, src: int, dst: int) -> None:
    token = _pop_trailing_item(seq, src)
    if token is not None:
        _attach_trailing(seq, dst, token)


def _pop_trailing_item(seq: CommentedSeq, index: int) -> Any:
    value = seq[index]
    if isinstance(value, CommentedMap | CommentedSeq) and not value.fa.flow_style():
        found = _pop_trailing(value)
        if found is not None:
            return found
    return None


def _move_trailing_key_comment(item: CommentedMap, src_key: Any, dst_key: Any) -> None:
    holder = CommentedMap()
    holder[src_key] = item[src_key]
    holder.ca.items.update({src_key: item.ca.items[src_key]} if src_key in item.ca.items else {})
    token = _pop_trailing(holder)
    if token is None:
        return
    if src_key in holder.ca.items:
        item.ca.items[src_key] = holder.ca.items[src_key]
    _attach_trailing(item, dst_key, token)


def _replace_value(item: CommentedMap, key: str, value: Any) -> None:
    """Replace `item[key]` keeping a comment that trailed the old value."""
    holder = CommentedMap()
    holder[key] = item[key]
    if key in item.ca.items:
        holder.ca.items[key] = item.ca.items[key]
    token = _pop_trailing(holder)
    item[key] = value
    if key in holder.ca.items:
        item.ca.items[key] = holder.ca.items[key]
    if token is not None:
        _attach_trailing(item, key, token)


def _delete_key(item: CommentedMap, key: str) -> None:
    """Delete `item[key]`, handing a trailing comment to the previous key."""
    keys = list(item)
    holder = CommentedMap()
    holder[key] = item[key]
    if key in item.ca.items:
        holder.ca.items[key] = item.ca.items[key]
    token = _pop_trailing(holder)
    del item[key]
    item.ca.items.pop(key, None)
    if token is not None:
        prev = keys[keys.index(key) - 1] if keys.index(key) > 0 else None
        if prev is not None:
            _attach_trailing(item, prev, token)
