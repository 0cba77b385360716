"""Rename a node id everywhere the taxonomy folder refers to it.

Ids are dotted paths by convention (`weapons.explosives.synthesis` sits under
`weapons.explosives`), so renaming `OLD` to `NEW` also renames every node whose id starts with
`OLD.` (`OLD.x` -> `NEW.x`), keeping the paths true. References are updated in:

* every taxonomy YAML file of the folder: a node's `id` and each `broader` entry (the only keys
  that hold node ids; condition rules name context dimensions, not nodes);
* the folder's own crosswalks (`DIR/crosswalks/*.sssom.tsv`, as `taxonomy init` makes them) and,
  when given, another crosswalk folder: the `subject_id` cell of each mapping row.

The edit goes through ruamel.yaml's round trip (comments, key order, quoting and flow style kept);
crosswalk rows change only in the renamed cell. Before anything is written the renamed folder is
loaded and validated in a scratch copy, and every target must be writable; files are then replaced
one by one (each atomically), and if one write fails the ones already written are put back, so a
rename is all or nothing. `dry_run` returns the plan without writing.
"""

from __future__ import annotations

import difflib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.scalarstring import ScalarString

from refusal_atlas.errors import AtlasError, ValidationErrors
from refusal_atlas.io import atomic_write_bytes, brief, file_lock, write_text_like
from refusal_atlas.taxonomy.crosswalk import (
    LOCAL_DIR,
    crosswalk_files,
    read_sssom,
    rename_subjects,
)
from refusal_atlas.taxonomy.edit import _editable, _refuse_package_data, lock_path
from refusal_atlas.taxonomy.loader import CONDITIONS_FILE, id_problem, load_taxonomy, taxonomy_files, vocabulary_for
from refusal_atlas.taxonomy.model import Taxonomy
from refusal_atlas.taxonomy.yamlio import dump_to_text, item_line, load_for_edit, value_line

__all__ = ["Change", "RenamePlan", "plan_rename", "rename"]


@dataclass(frozen=True)
class Change:
    """One reference rewritten: where, which key, from what to what."""

    path: Path
    line: int
    key: str
    old: str
    new: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.key}: {self.old} -> {self.new}"


@dataclass
class RenamePlan:
    """What a rename changes: the ids (old -> new, file order), each reference, and the new file texts."""

    ids: dict[str, str]
    changes: list[Change] = field(default_factory=list)
    texts: dict[Path, str] = field(default_factory=dict)
    crosswalk_dirs: list[Path] = field(default_factory=list)
    exact: set[Path] = field(default_factory=set)  # written byte for byte (crosswalks), not restyled

    @property
    def files(self) -> list[Path]:
        return list(self.texts)

    def summary(self, dry_run: bool = False) -> str:
        first = next(iter(self.ids.items()))
        more = len(self.ids) - 1
        verb = "would rename" if dry_run else "renamed"
        text = (f"{verb} {first[0]} -> {first[1]}" + (f" and {more} node(s) below it" if more else "")
                + f": {len(self.changes)} reference(s) in {len(self.texts)} file(s)")
        if not self.crosswalk_dirs:
            text += "; this taxonomy has no crosswalks folder (DIR/crosswalks/) to update"
        return text + ("; nothing written" if dry_run else "")


def plan_rename(directory: Path | str, old: str, new: str, *, crosswalks: Path | str | None = None,
                vocabulary: Any = None, allow_default: bool = False) -> RenamePlan:
    """The rename as a plan (nothing written); raises AtlasError for an unknown, invalid or colliding id."""
    root = _editable(directory, allow_default)
    if not root.is_dir():
        raise AtlasError(f"{root}: rename works on a taxonomy folder (ids are referenced across its files); "
                         "pass the folder with --taxonomy")
    vocab = vocabulary_for(root, vocabulary)
    taxonomy = load_taxonomy(root, conditions=vocab)
    ids = _id_map(taxonomy, old, new)
    plan = RenamePlan(ids)
    for path in taxonomy_files(root):
        _plan_yaml(plan, path)
    local = root / LOCAL_DIR
    dirs = [local] if local.is_dir() else []
    if crosswalks is not None:
        extra = Path(crosswalks)
        if not extra.exists():
            raise AtlasError(f"{extra}: crosswalk folder not found")
        _refuse_package_data(extra, allow_default)
        if not any(extra.resolve() == d.resolve() for d in dirs):
            dirs.append(extra)
    plan.crosswalk_dirs = dirs
    for folder in dirs:
        for path in crosswalk_files(folder):
            _plan_crosswalk(plan, path)
    _check_result(root, plan, vocab)
    return plan


def rename(directory: Path | str, old: str, new: str, *, crosswalks: Path | str | None = None,
           dry_run: bool = False, vocabulary: Any = None, allow_default: bool = False) -> RenamePlan:
    """Rename `old` (and the `old.`-prefixed ids below it) to `new` in every file; see the module docstring."""
    root = _editable(directory, allow_default)
    with file_lock(lock_path(root)):
        plan = plan_rename(root, old, new, crosswalks=crosswalks, vocabulary=vocabulary,
                           allow_default=allow_default)
        if not dry_run:
            for path in plan.texts:  # a file linked into the shipped data is never edited through the link
                _refuse_package_data(path, allow_default)
            _write_all(plan.texts, plan.exact)
    return plan


# --- planning ------------------------------------------------------------------------------------


def _id_map(taxonomy: Taxonomy, old: str, new: str) -> dict[str, str]:
    if old not in taxonomy.nodes:
        close = difflib.get_close_matches(old, list(taxonomy.nodes), n=1, cutoff=0.6)
        hint = f" (did you mean {brief(close[0])}?)" if close else ""
        raise AtlasError(f"cannot rename {brief(old)}: no such node id{hint}; `refusal-atlas taxonomy show -t DIR` "
                         "lists the ids")
    problem = id_problem(new)
    if problem:
        raise AtlasError(f"cannot rename {brief(old)} to {brief(new)}: {problem}")
    if new == old:
        raise AtlasError(f"cannot rename {brief(old)}: the new id is the same as the old one")
    ids = {nid: new + nid[len(old):] for nid in taxonomy.nodes if nid == old or nid.startswith(old + ".")}
    staying = set(taxonomy.nodes) - set(ids)
    for before, after in ids.items():
        problem = id_problem(after)
        if problem:
            raise AtlasError(f"cannot rename {brief(old)} to {brief(new)}: {brief(before)} would become {problem}")
        if after in staying:
            other = taxonomy.nodes[after]
            what = "" if before == old else f" ({brief(before)} would become {brief(after)})"
            raise AtlasError(f"cannot rename {brief(old)} to {brief(new)}{what}: node {brief(after)} already exists "
                             f"({other.source_file}:{other.source_line}); choose another id, or deprecate or "
                             "rename that node first")
    return ids


def _styled(old: Any, value: str) -> Any:
    """`value` in the quoting style of the scalar it replaces (a quoted id stays quoted)."""
    return type(old)(value) if isinstance(old, ScalarString) else value


def _position(container: Any, key: Any) -> tuple[int, int] | None:
    """0-based (line, column) where the value at `key` starts in the file, from ruamel's line/column record."""
    try:
        where = container.lc.value(key) if isinstance(container, CommentedMap) else container.lc.item(key)
    except (KeyError, TypeError, AttributeError, IndexError):
        return None
    return (int(where[0]), int(where[1])) if where is not None else None


def _swap_token(line: str, col: int, old: str, new: str) -> str | None:
    """`line` with the id token `old` (plain, '-' or "-quoted) that starts at `col` replaced by `new`, else None."""
    for quote in ("", '"', "'"):
        token = quote + old + quote
        end = col + len(token)
        if line.startswith(token, col) and (quote or end == len(line) or line[end] in " \t,]}#"):
            return line[:col] + quote + new + quote + line[end:]
    return None


def _text_edit(text: str, spots: list[tuple[tuple[int, int] | None, str, str]]) -> str | None:
    """`text` with each id token replaced in place (every other byte kept), or None when a spot is not a
    simple token (an anchor, an escape, a multi-line scalar): the caller then re-dumps the file."""
    lines = text.split("\n")
    for where, old, new in sorted(spots, key=lambda s: (s[0] or (-1, -1)), reverse=True):
        if where is None or where[0] >= len(lines):
            return None
        swapped = _swap_token(lines[where[0]], where[1], old, new)
        if swapped is None:
            return None
        lines[where[0]] = swapped
    return "\n".join(lines)


def _plan_yaml(plan: RenamePlan, path: Path) -> None:
    """Rename in one file: replace the id tokens in the text itself, so comments, spacing and quoting stay byte for
    byte; fall back to ruamel's round trip (comments and order kept, spacing normalised) where that cannot work."""
    data, yaml = load_for_edit(path)
    seq = data.get("nodes") if isinstance(data, CommentedMap) else None
    if not isinstance(seq, CommentedSeq):
        return
    changes: list[Change] = []
    spots: list[tuple[tuple[int, int] | None, str, str]] = []
    for item in seq:
        if not isinstance(item, CommentedMap):
            continue
        nid = item.get("id")
        if isinstance(nid, str) and nid in plan.ids:
            changes.append(Change(path, value_line(item, "id"), "id", nid, plan.ids[nid]))
            spots.append((_position(item, "id"), nid, plan.ids[nid]))
            item["id"] = _styled(nid, plan.ids[nid])
        parents = item.get("broader")
        if isinstance(parents, list):
            for i, parent in enumerate(parents):
                if isinstance(parent, str) and parent in plan.ids:
                    changes.append(Change(path, item_line(parents, i, value_line(item, "broader")), "broader",
                                          parent, plan.ids[parent]))
                    spots.append((_position(parents, i), parent, plan.ids[parent]))
                    parents[i] = _styled(parent, plan.ids[parent])
    if changes:
        plan.changes.extend(changes)
        text = path.read_bytes().decode("utf-8").lstrip("\ufeff").replace("\r\n", "\n")
        plan.texts[path] = _text_edit(text, spots) or dump_to_text(yaml, data)


def _plan_crosswalk(plan: RenamePlan, path: Path) -> None:
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AtlasError(f"{path}: cannot read this crosswalk ({exc}); fix or move it, then rename again") from exc
    bom = text.startswith("\ufeff")
    new_text, found = rename_subjects(text[1:] if bom else text, plan.ids)
    if found:
        plan.changes.extend(Change(path, line, "subject_id", a, b) for line, a, b in found)
        plan.texts[path] = ("\ufeff" if bom else "") + new_text
        plan.exact.add(path)


def _check_result(root: Path, plan: RenamePlan, vocab: Any) -> None:
    """Load the renamed folder (and crosswalks) from a scratch copy; refuse the rename if anything breaks."""
    with tempfile.TemporaryDirectory(prefix="refusal-atlas-rename-") as tmp:
        scratch = Path(tmp) / "taxonomy"
        for path in taxonomy_files(root):
            target = scratch / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            if path in plan.texts:
                target.write_text(plan.texts[path].replace("\r\n", "\n"), encoding="utf-8")
            else:
                shutil.copyfile(path, target)
        if (root / CONDITIONS_FILE).is_file():
            shutil.copyfile(root / CONDITIONS_FILE, scratch / CONDITIONS_FILE)
        try:
            renamed = load_taxonomy(scratch, conditions=vocab)
        except ValidationErrors as exc:
            raise AtlasError(f"{root}: the renamed taxonomy would not load ({exc.problems[0]}); nothing was "
                             "written") from exc
        missing = [plan.ids[o] for o in plan.ids if plan.ids[o] not in renamed.nodes]
        if missing:
            raise AtlasError(f"{root}: {brief(missing[0])} is missing after the rename; nothing was written")
        for folder in plan.crosswalk_dirs:
            for path in crosswalk_files(folder):
                copy = Path(tmp) / "crosswalk.sssom.tsv"
                copy.write_text(plan.texts.get(path) or path.read_text(encoding="utf-8-sig"), encoding="utf-8")
                mappings, _ = read_sssom(copy)
                stale = [m for m in mappings if m.node_id in plan.ids]
                if stale:
                    raise AtlasError(f"{path}:{stale[0].line}: subject_id {brief(stale[0].subject_id)} could not be "
                                     "renamed; edit the row by hand, then rename again")


def _write_all(texts: dict[Path, str], exact: set[Path]) -> None:
    """Replace every file, or none: check writability first, and restore the written ones if a write fails."""
    for path in texts:
        target = path.resolve()
        if not os.access(target, os.W_OK) or not os.access(target.parent, os.W_OK):
            raise AtlasError(f"{path}: not writable; nothing was renamed (fix the permissions, then rename again)")
    originals = {path: path.read_bytes() for path in texts}
    done: list[Path] = []
    try:
        for path, text in texts.items():
            if path in exact:
                atomic_write_bytes(path, text.encode("utf-8"))
            else:
                write_text_like(path, text)
            done.append(path)
    except OSError as exc:
        for path in done:
            atomic_write_bytes(path, originals[path])
        raise AtlasError(f"{exc.filename or path}: could not be written ({exc.strerror or exc}); the rename was "
                         "undone in every file") from exc
