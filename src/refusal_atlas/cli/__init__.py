"""The `refusal-atlas` command: a thin Typer app over the library API.

Each area has its own module exporting a Typer sub-app; errors the user can fix are
`AtlasError`s, printed as one line (or one line per problem) with exit code 1, never a traceback.
"""

from __future__ import annotations

import importlib
import re
import sys

import typer

from refusal_atlas.errors import AtlasError
from refusal_atlas.terminal import guard_standard_streams, one_line

INTERRUPTED = "interrupted; rerun the same command to resume"

try:  # loading the sub-commands imports torch and transformers: seconds in which a Ctrl-C must not be a traceback
    from refusal_atlas.cli import atlas, curate, directions, harm, ontology, organism, sae, taxonomy, validate
    from refusal_atlas.cli.console import RICH_MARKUP_MODE
except KeyboardInterrupt:
    print(INTERRUPTED, file=sys.stderr)
    sys.exit(130)

_LOCATED = re.compile(r"^(\S+:\d+(:\d+)?: |error: )")

app = typer.Typer(
    name="refusal-atlas",
    help="Map sources of harm to refusal mechanisms inside chat models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # the root's mode governs every sub-command's help: literal text, so `[a-z0-9_.-]` stays visible
    rich_markup_mode=RICH_MARKUP_MODE,
)
app.add_typer(taxonomy.app, name="taxonomy", help="Validate, show, edit and resolve the conditional taxonomy.")
app.add_typer(ontology.app, name="ontology", help="YAML <-> RDF, SHACL validation, SPARQL and canned queries.")
app.add_typer(curate.app, name="curate", help="Prompt sets, response collection, refusal detection, clustering.")
app.add_typer(directions.app, name="directions", help="Per-node refusal directions, geometry, causal tests.")
app.add_typer(organism.app, name="organism", help="Build a model organism that follows the taxonomy's policy.")
app.add_typer(harm.app, name="harm", help="Harmfulness vs refusal per harm source: the 2×2, jailbreaks, verdicts.")
app.add_typer(sae.app, name="sae", help="Sparse autoencoders (SAELens format): train, inspect, per-node features.")
atlas.register(app)
validate.register(app)




def _interrupted() -> None:
    print(INTERRUPTED, file=sys.stderr)
    sys.exit(130)


def _os_error_line(exc: OSError) -> str:
    """`error: PATH: reason` for an OSError that no specific handler turned into an AtlasError."""
    where = one_line(str(exc.filename)) if exc.filename is not None else None
    reason = exc.strerror or str(exc) or type(exc).__name__
    hint = {PermissionError: "; choose a path you can write to, or fix its permissions",
            IsADirectoryError: "; name a file, not a folder",
            FileNotFoundError: "; check the path",
            NotADirectoryError: "; a parent of the path is a file",
            FileExistsError: "; a file is where a folder is needed: move it or choose another path"}.get(type(exc), "")
    return f"error: {where}: {reason}{hint}" if where is not None else f"error: {reason}{hint}"


def _usage_error_types() -> tuple[type[BaseException], ...]:
    """click's usage-error base class, wherever it lives: typer ≥ 0.2x carries its own copy of click
    (`typer._click`), whose exceptions are not `click.ClickException`, and older typer raises click's own."""
    found: list[type[BaseException]] = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(importlib.import_module(module).ClickException)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def main() -> None:
    """Entry point: run the app, turning AtlasError into a one-line message and exit 1."""
    guard_standard_streams()  # file names, column names and texts in any message: control characters shown
    try:
        rc = app(standalone_mode=False)
    except AtlasError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(line if _LOCATED.match(line) else f"error: {line}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except typer.Abort as exc:
        # click (outside typer's own handler) turns Ctrl-C into Abort; still say how to resume, exit 130
        if isinstance(exc.__context__, KeyboardInterrupt) or isinstance(exc.__cause__, KeyboardInterrupt):
            _interrupted()
        sys.exit(1)
    except OSError as exc:
        # a safety net: sources turn the errors they expect into AtlasErrors with advice
        print(_os_error_line(exc), file=sys.stderr)
        sys.exit(1)
    except typer.Exit as exc:
        # typer turns Ctrl-C into Exit(130) with nothing printed
        if isinstance(exc.__cause__, KeyboardInterrupt) or isinstance(exc.__context__, KeyboardInterrupt):
            _interrupted()
        sys.exit(exc.exit_code)
    except Exception as exc:  # usage errors (unknown option, missing argument, bad value)
        if isinstance(exc, _usage_error_types()):
            exc.show()  # type: ignore[attr-defined]
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        raise
    if rc == 130:  # typer's non-standalone mode returns Ctrl-C as exit code 130, having printed nothing
        _interrupted()
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
