"""One artifact schema: every file a stage writes is declared once and read by the store, and every file the
store reads is one a stage writes."""

from __future__ import annotations

import ast
import inspect
import re

from fixtures.atlas.builder import full_atlas
from refusal_atlas.atlas import (
    pipeline,
    pipeline_causal,
    sae_read,
    schema,
    store,
    store_clusters,
    store_read,
    store_results,
)
from refusal_atlas.atlas.store import AtlasStore
from refusal_atlas.mechinterp.causal import files as causal_files
from refusal_atlas.mechinterp.causal import protocol, suite

STORE_MODULES = (store, store_clusters, store_read, store_results, sae_read)
FILE_LITERAL = re.compile(r"""["'][\w./-]+\.(parquet|json|csv|ttl|graphml|yaml|html|png)["']""")


def _names(module: object, owner: str) -> set[str]:
    """Every `<owner>.NAME` attribute a module's source reads."""
    tree = ast.parse(inspect.getsource(module))  # type: ignore[arg-type]
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == owner}


def _artifact_names() -> dict[str, schema.Artifact]:
    """schema constant name -> artifact, for the constants naming one file."""
    return {k: v for k, v in vars(schema).items() if isinstance(v, schema.Artifact)}


def test_every_declared_file_is_read_by_the_store():
    read_schema = set().union(*(_names(m, "schema") for m in STORE_MODULES))
    read_causal = set().union(*(_names(m, "causal_files") for m in STORE_MODULES))
    by_name = {a.name: k for k, a in vars(causal_files).items() if isinstance(a, causal_files.TableSpec)}
    by_name |= {v: k for k, v in vars(causal_files).items() if isinstance(v, str) and "." in v and k.isupper()}
    figures = {causal_files.CROSS_ABLATION_FIGURE, causal_files.STEERING_FIGURE}  # found by AtlasStore.figures()
    for artifact in schema.ARTIFACTS:
        if artifact.stage == "causal":
            if artifact.name not in figures:
                assert by_name[artifact.name] in read_causal, f"{artifact.path}: no store accessor reads it"
            continue
        const = [k for k, a in _artifact_names().items() if a.name == artifact.name]
        assert const and set(const) & read_schema, f"{artifact.path}: no store accessor reads it"


def test_every_file_the_store_reads_is_declared_and_written():
    declared = set(vars(schema)) | {"causal", "CAUSAL", "Artifact"}
    for module in STORE_MODULES:
        assert _names(module, "schema") <= declared, module.__name__
        assert not FILE_LITERAL.search(inspect.getsource(module)), f"{module.__name__} names a file itself"
    written = {*causal_files.TABLES, *causal_files.SCANS} | set(causal_files.JSON_FILES)
    for name in _names(store, "causal_files") - {"TableSpec"}:
        value = getattr(causal_files, name)
        assert value in written or value == causal_files.SKIPPED, name
    # the writers take their names from the same declarations
    for writer in (pipeline, pipeline_causal, protocol, suite):
        literals = {m.group(0) for m in FILE_LITERAL.finditer(inspect.getsource(writer))}
        assert not literals, f"{writer.__name__} names files of its own: {sorted(literals)}"


def test_stage_outputs_come_from_the_schema():
    stages = {s.name: s.outputs for s in pipeline.build_pipeline(pipeline.RunConfig(progress=False)).stages}
    assert stages == schema.STAGE_OUTPUTS
    for outputs in stages.values():
        for path in outputs:
            assert path in {a.path for a in schema.ARTIFACTS} | {schema.CLUSTERS_DIR, schema.CAUSAL_DIR}


def test_the_store_reads_every_file_of_a_written_atlas(tmp_path):
    atlas = full_atlas(tmp_path / "atlas-out")
    st = AtlasStore(str(atlas))
    present = {a.path for a in schema.ARTIFACTS if (atlas / a.path).is_file()}
    assert {f"causal/{t.name}" for t in (causal_files.CROSS_ABLATION, causal_files.STEERING, causal_files.CONDITIONS,
                                         causal_files.SELECTION, causal_files.WORDING)} <= present
    for artifact in schema.ARTIFACTS:
        if artifact.path in present and artifact.columns is not None:
            table = st.table(artifact)
            assert table is not None and list(table.columns) == [artifact.view.get(c, c) for c in artifact.columns
                                                                 if c in table.columns or c in artifact.view]
    for path in atlas.rglob("*"):
        rel = path.relative_to(atlas).as_posix()
        if path.is_file() and rel.split("/")[0] in ("causal", "directions", "overlap") and path.suffix in (
                ".parquet", ".json", ".graphml"):
            assert rel in {a.path for a in schema.ARTIFACTS}, f"{rel}: written but not in the schema"
