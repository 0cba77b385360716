"""The condition vocabulary: which context dimensions (user age, purpose, ...) and values exist.

Rules in the taxonomy may only name dimensions and values defined here, so a typo such as
`user_age: minr` is an error instead of a rule that silently never matches. Values carry a
DPV IRI where DPV has the concept (the ontology layer maps them with `skos:closeMatch`).

File format (`data/conditions.yaml`)::

    dimensions:
      user_age:
        label: User age
        definition: ...
        values:
          minor: {label: Minor, definition: ..., dpv: "https://w3id.org/dpv#Child"}
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from refusal_atlas import paths
from refusal_atlas.errors import AtlasError, ValidationErrors
from refusal_atlas.io import brief
from refusal_atlas.taxonomy.model import Behaviour, ConditionRule
from refusal_atlas.taxonomy.yamlio import Problem, key_line, read_yaml, value_line

NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_")


class ConditionValue(BaseModel):
    """One value of a dimension (e.g. user_age=minor)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str
    definition: str
    dpv: str | None = None


class Dimension(BaseModel):
    """One context dimension and its allowed values (insertion order = file order)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str
    definition: str
    values: dict[str, ConditionValue] = Field(default_factory=dict)


class ConditionVocabulary(BaseModel):
    """All dimensions; `problem()` says what is wrong with a (dimension, value) pair, if anything."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dimensions: dict[str, Dimension] = Field(default_factory=dict)
    source: str | None = Field(default=None, exclude=True, repr=False)

    def problem(self, dimension: str, value: str) -> str | None:
        """A one-line message if `dimension=value` is not in the vocabulary, else None."""
        if dimension not in self.dimensions:
            return (f"unknown condition dimension {brief(dimension)}{_suggest(dimension, self.dimensions)}; "
                    f"known dimensions: {', '.join(self.dimensions)}")
        values = self.dimensions[dimension].values
        if value not in values:
            return (f"unknown value {brief(value)} for condition dimension {brief(dimension)}"
                    f"{_suggest(value, values)}; "
                    f"allowed: {', '.join(values)}")
        return None

    def check(self, context: dict[str, str]) -> None:
        """Raise AtlasError naming the first unknown dimension/value in a context."""
        for dim, value in context.items():
            msg = self.problem(dim, value)
            if msg:
                raise AtlasError(f"{msg} (vocabulary: {self.source or 'conditions.yaml'})")


def _suggest(word: str, choices: Any) -> str:
    if len(word) > 100:  # no close match is that long; difflib's cost grows with the length
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {brief(close[0])}?)" if close else ""


def load_conditions(path: Path | str | None = None) -> ConditionVocabulary:
    """Load a condition vocabulary (None = the shipped `data/conditions.yaml`).

    Raises ValidationErrors with one `path:line: message` per problem.
    """
    file = Path(path) if path is not None else paths.conditions_file()
    if not file.is_file():
        raise AtlasError(f"{file}: condition vocabulary not found; pass an existing conditions.yaml")
    data, problems = read_yaml(file)
    shown = str(file)
    if problems:
        raise ValidationErrors([str(p) for p in problems])
    dims: dict[str, Dimension] = {}
    if not isinstance(data, dict) or "dimensions" not in data:
        raise ValidationErrors([f"{shown}:1: expected a top-level `dimensions:` mapping"])
    for key in data:
        if key != "dimensions":
            problems.append(Problem(shown, key_line(data, key), f"unknown top-level key {brief(key)}; "
                                                                 "only `dimensions:` is allowed"))
    raw_dims = data["dimensions"]
    if not isinstance(raw_dims, dict) or not raw_dims:
        problems.append(Problem(shown, value_line(data, "dimensions"), "`dimensions` must be a non-empty mapping"))
        raw_dims = {}
    for dim, spec in raw_dims.items():
        line = key_line(raw_dims, dim)
        if not isinstance(dim, str) or not set(dim) <= NAME_CHARS:
            problems.append(Problem(shown, line, f"dimension name {brief(dim)} must use only a-z, 0-9 and '_'"))
            continue
        parsed = _parse_dimension(shown, dim, spec, line, problems)
        if parsed is not None:
            dims[dim] = parsed
    if problems:
        raise ValidationErrors([str(p) for p in sorted(set(problems))])
    return ConditionVocabulary(dimensions=dims, source=shown)


def _parse_dimension(shown: str, dim: str, spec: Any, line: int, problems: list[Problem]) -> Dimension | None:
    if not isinstance(spec, dict):
        problems.append(Problem(shown, line, f"dimension {brief(dim)} must be a mapping with label, "
                                                  "definition, values"))
        return None
    ok = True
    for key in spec:
        if key not in ("label", "definition", "values"):
            problems.append(Problem(shown, key_line(spec, key, line),
                                    f"unknown key {brief(key)} in dimension {brief(dim)}"
                                    f"{_suggest(str(key), ['label', 'definition', 'values'])}"))
            ok = False
    for key in ("label", "definition"):
        if not isinstance(spec.get(key), str) or not spec.get(key, "").strip():
            problems.append(Problem(shown, key_line(spec, key, line),
                                    f"dimension {brief(dim)} needs a non-empty string `{key}`"))
            ok = False
    raw_values = spec.get("values")
    if not isinstance(raw_values, dict) or not raw_values:
        problems.append(Problem(shown, key_line(spec, "values", line),
                                f"dimension {brief(dim)} needs a non-empty `values` mapping"))
        return None
    values: dict[str, ConditionValue] = {}
    for name, vspec in raw_values.items():
        vline = key_line(raw_values, name, line)
        if not isinstance(name, str) or not set(name) <= NAME_CHARS:
            problems.append(Problem(shown, vline, f"value name {brief(name)} of {brief(dim)} "
                                                   "must use only a-z, 0-9 and '_'"))
            ok = False
            continue
        if not isinstance(vspec, dict):
            problems.append(Problem(shown, vline, f"value {dim}={name} must be a mapping with label and definition"))
            ok = False
            continue
        bad = [k for k in vspec if k not in ("label", "definition", "dpv")]
        for k in bad:
            hint = _suggest(str(k), ["label", "definition", "dpv"])
            problems.append(Problem(shown, key_line(vspec, k, vline), 
                                    f"unknown key {brief(k)} in value {dim}={name}{hint}"))
        missing = [k for k in ("label", "definition") if not isinstance(vspec.get(k), str)]
        for k in missing:
            problems.append(Problem(shown, vline, f"value {dim}={name} needs a string `{k}`"))
        dpv = vspec.get("dpv")
        if dpv is not None and (not isinstance(dpv, str) or not dpv.startswith(("http://", "https://"))):
            problems.append(Problem(shown, key_line(vspec, "dpv", vline),
                                    f"value {dim}={name}: `dpv` must be a full IRI (https://w3id.org/dpv#...)"))
            continue
        if bad or missing:
            ok = False
            continue
        values[name] = ConditionValue(label=vspec["label"], definition=vspec["definition"], dpv=dpv)
    if not ok:
        return None
    return Dimension(label=spec["label"], definition=spec["definition"], values=values)


def parse_condition(text: str) -> dict[str, str]:
    """Parse `"user_age=minor,purpose=research"` into a context dict (vocabulary not checked here)."""
    context: dict[str, str] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        dim, sep, value = part.partition("=")
        dim, value = dim.strip(), value.strip()
        if not sep or not dim or not value:
            raise AtlasError(f"condition {brief(text)}: expected dim=value[,dim=value], got {brief(part)}")
        if dim in context and context[dim] != value:
            raise AtlasError(f"condition {brief(text)}: dimension {brief(dim)} given twice "
                             f"({brief(context[dim])}, {brief(value)})")
        context[dim] = value
    if not context:
        raise AtlasError(f"condition {brief(text)}: expected dim=value[,dim=value]")
    return context


def parse_rule(text: str) -> ConditionRule:
    """Parse `"dim=value,dim=value:behaviour"` (the CLI's --condition form) into a ConditionRule."""
    when_text, sep, behaviour = text.rpartition(":")
    if not sep:
        raise AtlasError(f"condition rule {brief(text)}: expected 'dim=value[,dim=value]:behaviour', "
                         f"behaviour one of {', '.join(b.value for b in Behaviour)}")
    behaviour = behaviour.strip()
    try:
        expect = Behaviour(behaviour)
    except ValueError:
        raise AtlasError(f"condition rule {brief(text)}: unknown behaviour {brief(behaviour)}"
                         f"{_suggest(behaviour, [b.value for b in Behaviour])}; "
                         f"allowed: {', '.join(b.value for b in Behaviour)}") from None
    return ConditionRule(when=parse_condition(when_text), expect=expect)
