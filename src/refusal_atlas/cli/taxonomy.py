"""CLI: `refusal-atlas taxonomy ...` (thin layer over refusal_atlas.taxonomy).

Read-only commands (validate, show, resolve, diff) default to the shipped taxonomy. Editing
commands (propose, accept, deprecate, move, rename) need `--taxonomy DIR`: the shipped taxonomy is
package data inside the installed tool, so edits there would be lost on reinstall and would
silently change every later run. `taxonomy init DIR` copies it (with its condition vocabulary
and crosswalks, which name its node ids) into a folder you own. Problems are raised as AtlasError /
ValidationErrors; the main entry prints them as `path:line: message` lines and exits 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from refusal_atlas import paths
from refusal_atlas.cli.console import plain_console, styled, sub_app
from refusal_atlas.errors import AtlasError, ValidationErrors
from refusal_atlas.taxonomy import edit
from refusal_atlas.taxonomy.conditions import parse_condition
from refusal_atlas.taxonomy.crosswalk import (
    LOCAL_DIR,
    Mapping,
    check_crosswalks,
    crosswalk_dir_for,
    externals_for_node,
    load_crosswalks,
)
from refusal_atlas.taxonomy.diff import diff_taxonomies
from refusal_atlas.taxonomy.loader import load_taxonomy, vocabulary_for
from refusal_atlas.taxonomy.model import Status, Taxonomy
from refusal_atlas.taxonomy.rename import rename as rename_node
from refusal_atlas.taxonomy.resolve import (
    contextual_nodes,
    default_source,
    effective_rules,
    format_when,
    resolve,
)

app = sub_app("Validate, show, edit and resolve the conditional taxonomy.")

TaxonomyOpt = Annotated[Path | None, typer.Option("--taxonomy", "-t", help="Taxonomy directory (default: shipped).")]
ConditionsOpt = Annotated[Path | None, typer.Option(
    "--conditions", help="Condition vocabulary (default: DIR/conditions.yaml, else the shipped one).")]
EditTaxonomyOpt = Annotated[Path | None, typer.Option(
    "--taxonomy", "-t", help="Taxonomy directory to edit (required; `taxonomy init DIR` makes one).")]


def _console() -> Console:
    # labels, definitions and ids are user text: never markup
    return plain_console()


def _edit_dir(directory: Path | None) -> Path:
    if directory is None:
        raise AtlasError("editing commands need --taxonomy DIR: the shipped taxonomy is read-only package data; "
                         "copy it with `refusal-atlas taxonomy init DIR` and edit the copy")
    return directory


def _crosswalks_for(directory: Path | None, crosswalks: Path | None) -> list[Mapping]:
    """The taxonomy's crosswalks: `--crosswalks`, else DIR/crosswalks/, else the shipped ones for the shipped
    taxonomy, else none."""
    folder = crosswalk_dir_for(directory, crosswalks)
    if folder is None:
        return []
    return load_crosswalks(folder)


def one_taxonomy_dir(directory: Path | None, taxonomy_dir: Path | None) -> Path | None:
    """The taxonomy a command reads, given as its DIRECTORY argument or as `-t` (the spelling of every
    other taxonomy command); naming two different ones is an error."""
    if directory is not None and taxonomy_dir is not None and directory != taxonomy_dir:
        raise AtlasError(f"two taxonomies named ({directory} and -t {taxonomy_dir}); name one")
    return directory if directory is not None else taxonomy_dir


TaxonomyAliasOpt = Annotated[Path | None, typer.Option(
    "--taxonomy", "-t", help="The same as DIRECTORY, spelt as the other taxonomy commands take it.")]


@app.command()
def validate(
    directory: Annotated[Path | None, typer.Argument(help="Taxonomy directory or file (default: shipped).")] = None,
    conditions: ConditionsOpt = None,
    crosswalks: Annotated[Path | None, typer.Option(
        help="Also check a folder of *.sssom.tsv against the taxonomy (default: DIR/crosswalks/, else the "
             "shipped ones for the shipped taxonomy).")] = None,
    taxonomy_dir: TaxonomyAliasOpt = None,
) -> None:
    """Check every file; print a one-line summary, or every problem as `path:line: message` (exit 1)."""
    directory = one_taxonomy_dir(directory, taxonomy_dir)
    taxonomy = load_taxonomy(directory, conditions=conditions)
    mappings = _crosswalks_for(directory, crosswalks)
    problems = check_crosswalks(taxonomy, mappings)
    if problems:
        raise ValidationErrors([str(p) for p in problems])
    text = summary(taxonomy, directory or paths.default_taxonomy_dir(), len(mappings))
    if crosswalk_dir_for(directory, crosswalks) is None and directory is not None and Path(directory).is_dir():
        # still one line: the note says what is missing and how to add it
        text += f"; no crosswalks (add {Path(directory) / LOCAL_DIR}/*.sssom.tsv or pass --crosswalks DIR)"
    typer.echo(text)


def summary(taxonomy: Taxonomy, where: Path, n_mappings: int = 0) -> str:
    """`N nodes (...), M rules, ...` in one line."""
    by_status = {s: sum(1 for n in taxonomy if n.status is s) for s in Status}
    rules = sum(len(n.conditions) for n in taxonomy)
    depth = max((taxonomy.depth(n.id) for n in taxonomy), default=0)
    text = (f"{where}: valid: {len(taxonomy)} nodes ({by_status[Status.ACCEPTED]} accepted, "
            f"{by_status[Status.PROPOSED]} proposed, {by_status[Status.DEPRECATED]} deprecated), "
            f"{rules} rules, {len(contextual_nodes(taxonomy))} contextual nodes, {len(taxonomy.roots())} roots, "
            f"{depth} levels")
    if n_mappings:
        text += f", {n_mappings} crosswalk mappings"
    return text


@app.command()
def show(
    node_id: Annotated[str | None, typer.Argument(help="A node id (default: all nodes).")] = None,
    tree: Annotated[bool, typer.Option("--tree", help="Show the hierarchy as a tree.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    taxonomy_dir: TaxonomyOpt = None,
    conditions: ConditionsOpt = None,
) -> None:
    """List the nodes (table or --tree), or one node with its resolved defaults and inherited rules."""
    taxonomy = load_taxonomy(taxonomy_dir, conditions=conditions)
    if node_id is not None and node_id not in taxonomy.nodes:
        default_source(taxonomy, node_id)  # raises the unknown-id error with a suggestion
    console = _console()
    if as_json:
        ids = [node_id] if node_id else list(taxonomy.nodes)
        if tree and node_id:
            ids += taxonomy.descendants(node_id)
        mappings = _crosswalks_for(taxonomy_dir, None)
        typer.echo(json.dumps([_node_json(taxonomy, i, mappings) for i in ids], indent=2, ensure_ascii=False))
    elif tree:
        roots = [node_id] if node_id else [n.id for n in taxonomy.roots()]
        top = Tree(styled((taxonomy.scheme.title, "bold"), f" {taxonomy.scheme.version}"))
        for rid in roots:
            _add_tree(top, taxonomy, rid, set())
        console.print(top)
    elif node_id is None:
        console.print(_table(taxonomy))
    else:
        _show_node(console, taxonomy, node_id, _crosswalks_for(taxonomy_dir, None))


def _label(taxonomy: Taxonomy, nid: str) -> Text:
    node = taxonomy.nodes[nid]
    behaviour, source = default_source(taxonomy, nid)
    inherited = "" if source == nid else " (inherited)"
    rules = f", {len(node.conditions)} rule(s)" if node.conditions else ""
    status = "" if node.status is Status.ACCEPTED else f" [{node.status.value}]"
    return styled((nid, "bold"), f" {node.label}: {behaviour.value}{inherited}{rules}{status}")


def _add_tree(parent: Tree, taxonomy: Taxonomy, nid: str, path: set[str]) -> None:
    branch = parent.add(_label(taxonomy, nid))
    if nid in path:
        return
    for child in taxonomy.children(nid):
        extra = len(child.broader) > 1
        if extra and child.broader[0] != nid:
            branch.add(Text(f"{child.id} (also here; see under {child.broader[0]})"))
            continue
        _add_tree(branch, taxonomy, child.id, path | {nid})


def _table(taxonomy: Taxonomy) -> Table:
    table = Table(title=f"{taxonomy.scheme.title} {taxonomy.scheme.version}: {len(taxonomy)} nodes")
    table.add_column("id", no_wrap=True)
    for col in ("label", "default", "rules", "status"):
        table.add_column(col)
    for node in taxonomy:
        behaviour, source = default_source(taxonomy, node.id)
        default = behaviour.value + ("" if source == node.id else " *")
        table.add_row(node.id, node.label, default, str(len(node.conditions)), node.status.value)
    table.caption = "* inherited from a parent"
    return table


def _node_json(taxonomy: Taxonomy, nid: str, mappings: list[Mapping]) -> dict:
    node = taxonomy.nodes[nid]
    behaviour, source = default_source(taxonomy, nid)
    return {
        **node.to_yaml_dict(),
        "status": node.status.value,
        "default": {"behaviour": behaviour.value, "from": source},
        "effective_rules": [{"node": n, "when": dict(r.when), "expect": r.expect.value, "rationale": r.rationale}
                            for n, r in effective_rules(taxonomy, nid)],
        "children": [c.id for c in taxonomy.children(nid)],
        "ancestors": taxonomy.ancestors(nid),
        "crosswalks": [{"predicate": m.predicate_id, "object": m.object_id, "label": m.object_label}
                       for m in externals_for_node(mappings, nid)],
        "source": f"{node.source_file}:{node.source_line}",
    }


def _show_node(console: Console, taxonomy: Taxonomy, nid: str, mappings: list[Mapping]) -> None:
    node = taxonomy.nodes[nid]
    behaviour, source = default_source(taxonomy, nid)
    console.print(styled((node.id, "bold"), f" — {node.label}  ", (f"({node.source_file}:{node.source_line})", "dim")))
    console.print(Text(node.definition))
    console.print(f"kind: {node.kind or '-'}   status: {node.status.value}   "
                  f"broader: {', '.join(node.broader) or '(root)'}")
    console.print(f"default: {behaviour.value}" + ("" if source == nid else f" (inherited from {source})"))
    rules = effective_rules(taxonomy, nid)
    if rules:
        table = Table(title="condition rules (own and inherited)")
        for col in ("when", "expect", "from", "rationale"):
            table.add_column(col)
        for owner, rule in rules:
            table.add_row(format_when(rule.when), rule.expect.value, "own" if owner == nid else owner,
                          rule.rationale or "")
        console.print(table)
    children = taxonomy.children(nid)
    if children:
        console.print("children: " + ", ".join(c.id for c in children))
    for example in node.examples:
        console.print(f"  e.g. {example}")
    for m in externals_for_node(mappings, nid):
        console.print(f"  {m.predicate_id} {m.object_id} {m.object_label}")


@app.command("resolve")
def resolve_cmd(
    node_id: Annotated[str, typer.Argument(help="Node id.")],
    condition: Annotated[list[str] | None, typer.Option(
        "--condition", "-c", help="dim=value (repeatable; or dim=value,dim=value).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    taxonomy_dir: TaxonomyOpt = None,
    conditions: ConditionsOpt = None,
) -> None:
    """The expected behaviour for a node in a context, and the rule that decided it."""
    root = taxonomy_dir or paths.default_taxonomy_dir()
    vocab = vocabulary_for(root, conditions)
    taxonomy = load_taxonomy(root, conditions=vocab)
    context: dict[str, str] = {}
    for text in condition or []:
        for dim, value in parse_condition(text).items():
            if dim in context and context[dim] != value:
                raise AtlasError(f"--condition: dimension {dim!r} given twice ({context[dim]!r}, {value!r})")
            context[dim] = value
    vocab.check(context)
    result = resolve(taxonomy, node_id, context)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
        return
    shown_ctx = format_when(context) or "(no context)"
    typer.echo(f"{node_id} | {shown_ctx} -> {result.behaviour.value}")
    if result.rule is not None:
        where = "own rule" if result.source_node == node_id else f"rule on {result.source_node}"
        typer.echo(f"decided by: {where}: when {format_when(result.rule.when)} -> {result.rule.expect.value}"
                   + (f" ({result.rule.rationale})" if result.rule.rationale else ""))
    else:
        typer.echo(f"decided by: default of {result.source_node}")
    typer.echo(f"why: {result.reason}")



@app.command()
def propose(
    node_id: Annotated[str, typer.Option("--id", help="New node id ([a-z0-9_.-]).")],
    label: Annotated[str, typer.Option(help="Short label.")],
    definition: Annotated[str, typer.Option(help="One-sentence definition.")],
    parent: Annotated[list[str] | None, typer.Option(help="Parent id (repeatable; none = a new root).")] = None,
    expect: Annotated[str | None, typer.Option(
        help="Default behaviour: refuse | redirect | comply_with_caveats | comply (default: inherit).")] = None,
    condition: Annotated[list[str] | None, typer.Option(
        "--condition", help="Rule 'dim=value,dim=value:behaviour' (repeatable).")] = None,
    example: Annotated[list[str] | None, typer.Option("--example", help="Example request (repeatable).")] = None,
    kind: Annotated[str | None, typer.Option(help="Kind of harm source, e.g. capability_uplift.")] = None,
    file: Annotated[Path | None, typer.Option(help="File for a new root node (default: the last node file).")] = None,
    taxonomy_dir: EditTaxonomyOpt = None,
    conditions: ConditionsOpt = None,
) -> None:
    """Add a node with status `proposed` to its parent's file (comments and order kept)."""
    directory = _edit_dir(taxonomy_dir)
    node = edit.propose(directory, node_id, parent or None, label, definition, expect, condition or [],
                        example or [], kind=kind, vocabulary=conditions, file=file)
    typer.echo(f"proposed {node.id} in {node.source_file}; review it, then `refusal-atlas taxonomy accept "
               f"{node.id} --taxonomy {directory}`")


@app.command()
def accept(node_id: Annotated[str, typer.Argument(help="Node id.")], taxonomy_dir: EditTaxonomyOpt = None,
           conditions: ConditionsOpt = None,
           root: Annotated[bool, typer.Option(
               "--root", help="Accept a proposed node that has no parent as a new top-level branch.")] = False,
           ) -> None:
    """Mark a node accepted: refused while a field holds template text ("Rewrite this definition...", TODO,
    "...") or while it has no accepted parent (--root accepts a new top-level branch)."""
    node = edit.accept(_edit_dir(taxonomy_dir), node_id, vocabulary=conditions, allow_root=root)
    typer.echo(f"accepted {node.id} ({node.source_file})")


@app.command()
def rename(
    old: Annotated[str, typer.Argument(metavar="OLD", help="Current node id.")],
    new: Annotated[str, typer.Argument(metavar="NEW", help="New node id ([a-z0-9_.-]).")],
    taxonomy_dir: EditTaxonomyOpt = None,
    crosswalks: Annotated[Path | None, typer.Option(
        help="Also update this folder of *.sssom.tsv (DIR/crosswalks/ is always updated).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print every change; write nothing.")] = False,
    conditions: ConditionsOpt = None,
) -> None:
    """Rename a node id, and the ids below it that start with OLD., in every reference (broader, crosswalks).

    Comments and formatting are kept; a new id that exists already is refused; all files change or none.
    """
    plan = rename_node(_edit_dir(taxonomy_dir), old, new, crosswalks=crosswalks, dry_run=dry_run,
                       vocabulary=conditions)
    for change in plan.changes:
        typer.echo(str(change))
    typer.echo(plan.summary(dry_run))


@app.command()
def deprecate(node_id: Annotated[str, typer.Argument(help="Node id.")], taxonomy_dir: EditTaxonomyOpt = None,
              conditions: ConditionsOpt = None) -> None:
    """Mark a node deprecated (it stays in the file; ids are never reused)."""
    node = edit.deprecate(_edit_dir(taxonomy_dir), node_id, vocabulary=conditions)
    typer.echo(f"deprecated {node.id} ({node.source_file})")


@app.command()
def move(
    node_id: Annotated[str, typer.Argument(help="Node id.")],
    parent: Annotated[list[str] | None, typer.Option(help="New parent id (repeatable).")] = None,
    root: Annotated[bool, typer.Option("--root", help="Make the node a root (no parents).")] = False,
    taxonomy_dir: EditTaxonomyOpt = None,
    conditions: ConditionsOpt = None,
) -> None:
    """Give a node new parents (refused if it would make a cycle)."""
    if not parent and not root:
        raise AtlasError("move: give --parent P (repeatable) or --root")
    if parent and root:
        raise AtlasError("move: --parent and --root exclude each other")
    node = edit.move(_edit_dir(taxonomy_dir), node_id, parent or None, vocabulary=conditions)
    typer.echo(f"moved {node.id} under {', '.join(node.broader) or '(root)'}")


@app.command()
def diff(
    dir_a: Annotated[Path, typer.Argument(help="Old taxonomy directory.")],
    dir_b: Annotated[Path, typer.Argument(help="New taxonomy directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    conditions: ConditionsOpt = None,
) -> None:
    """Added, removed and changed nodes (field by field) from DIR_A to DIR_B."""
    result = diff_taxonomies(load_taxonomy(dir_a, conditions=conditions), load_taxonomy(dir_b, conditions=conditions))
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
        return
    for line in result.lines() or ["no differences"]:
        typer.echo(line)
    typer.echo(f"{len(result.added)} added, {len(result.removed)} removed, {len(result.changed)} changed")


@app.command()
def init(dest: Annotated[Path, typer.Argument(help="New folder for an editable copy.")]) -> None:
    """Copy the shipped taxonomy, its condition vocabulary and its crosswalks (DEST/crosswalks/) for editing."""
    target = edit.copy_default(dest)
    taxonomy = load_taxonomy(target)
    mappings = _crosswalks_for(target, None)
    typer.echo(f"copied {len(taxonomy)} nodes and {len(mappings)} crosswalk mappings to {target}; edit with "
               f"--taxonomy {target}")
