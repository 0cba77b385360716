"""`organism test`: read an organism folder and run the causal protocol's suite on it.

The organism package builds and loads organisms; the causal suite (`mechinterp.causal.suite`) takes
their tables as arguments. This module is the glue between the two layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refusal_atlas.errors import AtlasError
from refusal_atlas.mechinterp.causal.suite import OrganismTables, causal_suite
from refusal_atlas.organism.core import load_organism
from refusal_atlas.taxonomy.loader import load_taxonomy

__all__ = ["organism_tables", "run_organism_test"]


def organism_tables(organism_dir: str | Path) -> OrganismTables:
    """An organism folder's model, prompt and adherence tables, and each node's branch in the shipped taxonomy
    (`Taxonomy.branch_of`; no branches when the organism was built from another taxonomy)."""
    org = load_organism(organism_dir)
    rows = org.prompts()
    tax = load_taxonomy(None)
    branch_of = None
    if all(not n or n in tax.nodes for n in rows["node"]):
        branch_of = tax.branch_of
    return OrganismTables(Path(org.model_dir), rows, org.adherence, dict(org.info), branch_of, str(organism_dir))


def run_organism_test(organism_dir: str | Path, out_dir: str | Path, **options: Any) -> dict[str, Any]:
    """The causal suite on the organism in `organism_dir`, written to `out_dir`; `options` are `causal_suite`'s
    keywords (level, positions, select_layers, n_val, coeffs, max_new_tokens, batch_size, progress,
    refusal_tokens) with its defaults."""
    level = options.get("level", "root")
    if level not in ("root", "node"):
        raise AtlasError(f"--level {level!r}: use 'root' or 'node'")
    return causal_suite(organism_tables(organism_dir), out_dir, **options)
