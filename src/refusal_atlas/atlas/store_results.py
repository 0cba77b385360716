"""The store's accessors for the answering stages: findings (verdicts), harmfulness vs refusal (`harm/`) and the
planted-wording known answer on the organism's taught requests (`wording/`)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from refusal_atlas.atlas import schema
from refusal_atlas.atlas.store_read import read_json, read_table

__all__ = ["ResultsAccessors"]


class ResultsAccessors:
    """Mixed into `AtlasStore`: each accessor is None (or empty) when its stage has not run."""

    root: Path

    def _result_table(self, artifact: schema.Artifact) -> pd.DataFrame | None:
        return read_table(self.root / artifact.path)

    def _result_json(self, artifact: schema.Artifact) -> Any:
        path = self.root / artifact.path
        return read_json(path) if path.is_file() else None

    @cached_property
    def findings_file(self) -> Path | None:
        path = self.root / schema.FINDINGS.path
        return path if path.is_file() else None

    @cached_property
    def findings(self) -> dict[str, Any] | None:
        """findings.json: {"findings": [...]} as the verdicts stage wrote it."""
        data = self._result_json(schema.FINDINGS)
        return data if isinstance(data, dict) else None

    @cached_property
    def taught_replies(self) -> pd.DataFrame | None:
        """The organism's replies to the requests its wordings were taught on (the `wording` stage: prompt, node,
        expected, target = the taught reply, response, refused), or None where no organism was built."""
        return self._result_table(schema.WORDING_RESPONSES)

    @cached_property
    def harm_cells(self) -> pd.DataFrame | None:
        """n per cell (harmful/harmless × refused/complied) per node, with the too-small flag."""
        return self._result_table(schema.HARM_CELLS)

    @cached_property
    def harm_geometry(self) -> pd.DataFrame | None:
        """The harmfulness–refusal cosine per node and layer, beside both directions' split-half floors."""
        return self._result_table(schema.HARM_GEOMETRY)

    @cached_property
    def harm_projections(self) -> pd.DataFrame | None:
        return self._result_table(schema.HARM_PROJECTIONS)

    @cached_property
    def harm_causal(self) -> pd.DataFrame | None:
        return self._result_table(schema.HARM_CAUSAL)

    @cached_property
    def harm_findings(self) -> list[dict[str, Any]]:
        data = self._result_json(schema.HARM_FINDINGS)
        return [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []

    @cached_property
    def harm_summary(self) -> dict[str, Any] | None:
        return self._result_json(schema.HARM_JSON)

    @cached_property
    def harm_projection_figure(self) -> Path | None:
        path = self.root / schema.HARM_PROJECTIONS_PNG.path
        return path if path.is_file() else None
