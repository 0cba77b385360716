"""Per-taxonomy-node refusal directions (difference of means) and their on-disk format.

For every node k, layer l and position p (see `positions.py`):
- `diff_means`: mean over node k's harmful prompts minus the mean over the harmless set;
- `vs_other`:   node k's mean minus the mean of the *other* nodes' means (each node weighted
                equally, so a large node does not dominate) — what is specific to k among harms;
- `residual`:   `diff_means` with its projection on the pooled direction removed — what is left
                of k's direction once the shared refusal direction is taken out.
The pooled direction (every harmful prompt minus harmless) is stored as node `POOLED`.
With `strata` (a covariate per prompt, e.g. `request_form.request_form`), "the mean over the
harmless set" becomes a *matched* harmless baseline: the harmless means per stratum weighted by the
node's own share of prompts in each stratum (the effect of harm on the harmful prompts, with the
covariate held fixed). Without it a difference of means also encodes how the two sets differ in
form — see `request_form.py` for what that did to ablation.
Following Zhao et al. 2025, the *harmfulness* direction is read at `last_instruction` and the
*refusal* direction at the last template token (-1); `DirectionSet.harmfulness/refusal` say so.

All methods are functions of per-group means, so the noise estimates (`noise.py`) recompute
them from resampled group means with exactly the same code (`directions_from_means`).

On disk (`DirectionSet.save(dir)`): `directions.safetensors` with one `[n_layers, d_model]`
tensor per key `f"{method}/{node}/{position}"`, `noise.safetensors` (see `noise.py`), and
`directions.json` (model id + revision, layers, positions, prompts per node, norms, reliability).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from refusal_atlas.errors import AtlasError
from refusal_atlas.io import atomic_write, atomic_write_text
from refusal_atlas.lm.capture import Activations
from refusal_atlas.lm.positions import LAST_INSTRUCTION, Position, parse_position_label, position_label

POOLED = "@pooled"  # '@' cannot occur in a taxonomy id, so this never clashes with a node
METHODS = ("diff_means", "vs_other", "residual")
ROLES: dict[str, Position] = {"harmfulness": LAST_INSTRUCTION, "refusal": -1}
FORMAT_VERSION = 1


@dataclass
class Groups:
    """Prompt indices of the harmless set, of each node, and of harmful prompts with no node.

    `harmless_by_stratum` (empty: no matching) splits the harmless prompts by a covariate and
    `shares` [K+1, S] gives each node's (last row: every harmful prompt's) share of prompts per
    stratum: the weights of its matched harmless baseline.
    """

    harmless: Tensor
    nodes: dict[str, Tensor]
    unassigned: Tensor
    strata: tuple[str, ...] = ()
    harmless_by_stratum: list[Tensor] = field(default_factory=list)
    shares: Tensor | None = None

    @classmethod
    def from_labels(cls, nodes: Sequence[str], harmful: Sequence[bool], min_prompts: int = 2,
                    strata: Sequence[str] | None = None) -> Groups:
        if len(nodes) != len(harmful):
            raise AtlasError(f"{len(nodes)} node labels but {len(harmful)} harmful flags")
        if strata is not None and len(strata) != len(nodes):
            raise AtlasError(f"{len(nodes)} node labels but {len(strata)} strata")
        harmless = [i for i, h in enumerate(harmful) if not h]
        by_node: dict[str, list[int]] = {}
        unassigned: list[int] = []
        for i, (node, h) in enumerate(zip(nodes, harmful, strict=True)):
            if h:
                (by_node.setdefault(node, []) if node else unassigned).append(i)
        if len(harmless) < min_prompts:
            raise AtlasError(f"need at least {min_prompts} harmless prompts, got {len(harmless)}")
        small = {k: len(v) for k, v in by_node.items() if len(v) < min_prompts}
        if small:
            raise AtlasError(f"nodes with fewer than {min_prompts} prompts (add prompts or drop them): {small}")
        if not by_node:
            raise AtlasError("no harmful prompts with a taxonomy node")

        def t(x: list[int]) -> Tensor:
            return torch.tensor(x, dtype=torch.long)

        groups = cls(t(harmless), {k: t(v) for k, v in sorted(by_node.items())}, t(unassigned))
        return groups if strata is None else groups._matched(list(strata), max(2, min_prompts))

    def _matched(self, strata: list[str], min_harmless: int) -> Groups:
        """The same groups with the harmless baseline matched on `strata`.

        A stratum needs `min_harmless` harmless prompts to serve as a baseline; harmful prompts of any
        other stratum do not count towards the shares (nothing to match them with), and a node with
        no matchable prompt keeps the plain harmless mean. Fewer than two usable strata: no matching.
        """
        harmless_strata = [strata[i] for i in self.harmless.tolist()]
        usable = sorted(s for s in set(harmless_strata) if harmless_strata.count(s) >= min_harmless)
        if len(usable) < 2:
            return self
        by_stratum = [torch.tensor([i for i in self.harmless.tolist() if strata[i] == s], dtype=torch.long)
                      for s in usable]
        plain = torch.tensor([len(b) for b in by_stratum], dtype=torch.float32)
        plain = plain / plain.sum()
        harmful_sets = [*self.nodes.values(), torch.cat([*self.nodes.values(), self.unassigned])]
        rows = []
        for idx in harmful_sets:
            counts = torch.tensor([sum(strata[i] == s for i in idx.tolist()) for s in usable], dtype=torch.float32)
            rows.append(counts / counts.sum() if counts.sum() > 0 else plain)
        return Groups(self.harmless, self.nodes, self.unassigned, tuple(usable), by_stratum, torch.stack(rows))

    @property
    def node_ids(self) -> list[str]:
        return list(self.nodes)

    @property
    def harmless_groups(self) -> list[Tensor]:
        """The harmless prompts as groups: one per stratum when matched, else all of them."""
        return self.harmless_by_stratum or [self.harmless]

    def baseline_weights(self) -> Tensor:
        """[K+1, S]: each node's (last row: the pooled set's) weights on the harmless groups' means."""
        if self.shares is None:
            return torch.ones((len(self.nodes) + 1, 1))
        return self.shares

    def all_groups(self) -> list[Tensor]:
        """The harmless group(s) first, then the nodes in order, then the unassigned harmful prompts."""
        return [*self.harmless_groups, *self.nodes.values(), self.unassigned]

    def counts(self) -> dict[str, int]:
        return {"harmless": len(self.harmless), **{k: len(v) for k, v in self.nodes.items()},
                "unassigned_harmful": len(self.unassigned)}

    def matching(self) -> dict | None:
        """What the harmless baseline was matched on (for metadata), or None."""
        if self.shares is None:
            return None
        names = [*self.nodes, POOLED]
        return {"strata": list(self.strata),
                "harmless_per_stratum": {s: len(b) for s, b in zip(self.strata, self.harmless_by_stratum, strict=True)},
                "shares": {n: {s: round(float(w), 4) for s, w in zip(self.strata, row, strict=True)}
                           for n, row in zip(names, self.shares, strict=True)}}


def group_means(x: Tensor, groups: Groups, weights: list[Tensor] | None = None) -> Tensor:
    """Weighted means per group: `x` [n, ...] -> [R, G, ...] for R weight replicates.

    `weights[g]` is [R, n_g] with rows summing to one (None: plain means, R = 1). Empty groups
    give zeros.
    """
    flat = x.reshape(x.shape[0], -1)
    out = []
    for g, idx in enumerate(groups.all_groups()):
        if len(idx) == 0:
            r = 1 if weights is None else weights[0].shape[0]
            out.append(torch.zeros((r, flat.shape[1]), dtype=flat.dtype))
            continue
        w = torch.full((1, len(idx)), 1.0 / len(idx), dtype=flat.dtype) if weights is None else weights[g]
        out.append(w @ flat[idx])
    stacked = torch.stack(out, dim=1)
    return stacked.reshape(stacked.shape[0], stacked.shape[1], *x.shape[1:])


def directions_from_means(means: Tensor, groups: Groups) -> dict[str, Tensor]:
    """Every method's directions from group means [R, G, ...] -> {method: [R, K + 1, ...]}.

    Row K (after the nodes) is the pooled direction (`diff_means` only; zeros elsewhere).
    """
    s = len(groups.harmless_groups)
    harmless_means, nodes, unassigned = means[:, :s], means[:, s:-1], means[:, -1]
    k = nodes.shape[1]
    weights = groups.baseline_weights().to(means.dtype)  # [K+1, S]
    baseline = (weights.reshape(1, k + 1, s, *(1,) * (means.dim() - 2)) * harmless_means.unsqueeze(1)).sum(2)
    sizes = torch.tensor([len(v) for v in groups.nodes.values()], dtype=means.dtype)
    n_u = float(len(groups.unassigned))
    shape = (1, k) + (1,) * (nodes.dim() - 2)
    pooled_mean = ((nodes * sizes.reshape(shape)).sum(1) + n_u * unassigned) / (sizes.sum() + n_u)
    pooled = pooled_mean - baseline[:, k]
    diff = nodes - baseline[:, :k]
    if k > 1:
        others = (nodes.sum(1, keepdim=True) - nodes) / (k - 1)
        vs_other = nodes - others
    else:
        vs_other = torch.zeros_like(nodes)
    unit = pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    residual = diff - (diff * unit.unsqueeze(1)).sum(-1, keepdim=True) * unit.unsqueeze(1)
    zeros = torch.zeros_like(pooled).unsqueeze(1)
    return {
        "diff_means": torch.cat([diff, pooled.unsqueeze(1)], dim=1),
        "vs_other": torch.cat([vs_other, zeros], dim=1),
        "residual": torch.cat([residual, zeros], dim=1),
    }


def _key(method: str, node: str, position: Position) -> str:
    return f"{method}/{node}/{position_label(position)}"


@dataclass
class DirectionSet:
    """Directions per (method, node, position), each `[n_layers, d_model]`, plus noise and metadata."""

    tensors: dict[str, Tensor]
    nodes: list[str]
    layers: list[int]
    positions: list[Position]
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    meta: dict = field(default_factory=dict)
    noise: dict[str, Tensor] = field(default_factory=dict)

    @property
    def nodes_with_pooled(self) -> list[str]:
        return [*self.nodes, POOLED]

    def layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise AtlasError(f"layer {layer} not in this direction set (layers {self.layers})")
        return self.layers.index(layer)

    def position_index(self, position: Position) -> int:
        p = parse_position_label(position_label(position))
        if p not in self.positions:
            raise AtlasError(f"position {position!r} not in this direction set ({self.positions})")
        return self.positions.index(p)

    def node_index(self, node: str) -> int:
        names = self.nodes_with_pooled
        if node not in names:
            raise AtlasError(f"node {node!r} has no direction here; nodes: {', '.join(self.nodes)}")
        return names.index(node)

    def all_layers(self, node: str, position: Position, method: str = "diff_means") -> Tensor:
        """[n_layers, d_model]."""
        key = _key(method, node, parse_position_label(position_label(position)))
        if key not in self.tensors:
            self.node_index(node)
            self.position_index(position)
            raise AtlasError(f"no {method!r} direction for {node!r} (methods: {self.methods})")
        return self.tensors[key]

    def get(self, node: str, layer: int, position: Position, method: str = "diff_means") -> Tensor:
        """The raw direction (natural norm: the mean difference itself), [d_model]."""
        return self.all_layers(node, position, method)[self.layer_index(layer)]

    def unit(self, node: str, layer: int, position: Position, method: str = "diff_means") -> Tensor:
        v = self.get(node, layer, position, method)
        return v / v.norm().clamp_min(1e-12)

    def stack(self, layer: int, position: Position, method: str = "diff_means",
              nodes: Sequence[str] | None = None) -> Tensor:
        """[n_nodes, d_model] directions of several nodes at one layer and position."""
        return torch.stack([self.get(n, layer, position, method) for n in (nodes or self.nodes)])

    def harmfulness(self, node: str, layer: int, method: str = "diff_means") -> Tensor:
        """Zhao et al.'s harmfulness direction: read at the last instruction token."""
        return self.get(node, layer, self.meta.get("roles", ROLES)["harmfulness"], method)

    def refusal(self, node: str, layer: int, method: str = "diff_means") -> Tensor:
        """Zhao et al.'s refusal direction: read at the last post-instruction template token."""
        return self.get(node, layer, parse_position_label(str(self.meta.get("roles", ROLES)["refusal"])), method)

    def reliability(self, node: str, layer: int, position: Position, method: str = "diff_means") -> float | None:
        """Spearman–Brown-corrected split-half cosine (see noise.py), or None if not computed."""
        t = self.noise.get(f"{method}/reliability")
        if t is None:
            return None
        return float(t[self.node_index(node), self.layer_index(layer), self.position_index(position)])

    # ------------------------------------------------------------------ files
    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_safetensors(out / "directions.safetensors", {k: v.contiguous() for k, v in self.tensors.items()})
        if self.noise:
            _atomic_safetensors(out / "noise.safetensors", {k: v.contiguous() for k, v in self.noise.items()})
        meta = {
            "format_version": FORMAT_VERSION,
            "nodes": self.nodes,
            "pooled": POOLED,
            "layers": self.layers,
            "positions": [position_label(p) for p in self.positions],
            "methods": self.methods,
            "roles": {k: position_label(v) for k, v in self.meta.get("roles", ROLES).items()},
            "key_format": "{method}/{node}/{position} -> float32 [n_layers, d_model]",
            **{k: v for k, v in self.meta.items() if k != "roles"},
            "norm": self._norm_table(),
        }
        if self.noise:
            meta["reliability"] = _nested(self.noise.get("diff_means/reliability"), self.nodes_with_pooled,
                                          self.layers, self.positions)
            meta["split_half_cosine_mean"] = _nested(self.noise.get("diff_means/split_half_mean"),
                                                     self.nodes_with_pooled, self.layers, self.positions)
        atomic_write_text(out / "directions.json", json.dumps(meta, indent=1))
        return out

    def _norm_table(self) -> dict:
        """{method: {node: {position: [norm per layer]}}}."""
        table: dict = {}
        for key, t in self.tensors.items():
            method, node, pos = key.split("/", 2)
            table.setdefault(method, {}).setdefault(node, {})[pos] = [round(float(x), 6) for x in t.norm(dim=-1)]
        return table

    @classmethod
    def load(cls, out_dir: str | Path) -> DirectionSet:
        out = Path(out_dir)
        meta_file = out / "directions.json"
        if not meta_file.is_file():
            raise AtlasError(f"{out}: no directions.json; run `refusal-atlas directions extract` first")
        try:
            meta = json.loads(meta_file.read_text())
            tensors = load_file(str(out / "directions.safetensors"))
        except (OSError, ValueError) as exc:
            raise AtlasError(f"{out}: unreadable direction set ({exc})") from exc
        noise_file = out / "noise.safetensors"
        noise = load_file(str(noise_file)) if noise_file.is_file() else {}
        for k in ("format_version", "pooled", "key_format", "norm", "reliability", "split_half_cosine_mean"):
            meta.pop(k, None)
        nodes, layers = meta.pop("nodes"), meta.pop("layers")
        positions = [parse_position_label(p) for p in meta.pop("positions")]
        methods = meta.pop("methods")
        meta["roles"] = {k: parse_position_label(v) for k, v in meta.get("roles", {}).items()} or dict(ROLES)
        return cls(tensors, nodes, layers, positions, methods, meta, noise)


def _nested(t: Tensor | None, nodes: list[str], layers: list[int], positions: list[Position]) -> dict | None:
    """[K, L, P] -> {node: {position: [value per layer]}} for the JSON metadata."""
    if t is None:
        return None
    return {
        node: {position_label(p): [round(float(x), 6) for x in t[i, :, j]] for j, p in enumerate(positions)}
        for i, node in enumerate(nodes)
    }


def _atomic_safetensors(path: Path, tensors: dict[str, Tensor]) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def compute_directions(acts: Activations, nodes: Sequence[str], harmful: Sequence[bool],
                       methods: Sequence[str] = METHODS, meta: dict[str, Any] | None = None,
                       strata: Sequence[str] | None = None) -> DirectionSet:
    """Directions for every node, layer and position of an `Activations` (no noise estimates);
    with `strata`, against a harmless baseline matched on them (see the module docstring)."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise AtlasError(f"unknown methods {bad}; choose from {METHODS}")
    groups = Groups.from_labels(nodes, harmful, strata=strata)
    means = group_means(acts.acts, groups)  # [1, G, L, P, d]
    dirs = directions_from_means(means, groups)
    tensors: dict[str, Tensor] = {}
    names = [*groups.node_ids, POOLED]
    for method in methods:
        for i, node in enumerate(names):
            if node == POOLED and method != "diff_means":
                continue
            for j, p in enumerate(acts.positions):
                tensors[_key(method, node, p)] = dirs[method][0, i, :, j].clone()
    info = {
        **{k: v for k, v in acts.meta.items() if k.startswith("model")},
        "n_prompts": groups.counts(),
        "roles": dict(ROLES),
        **({"harmless_matched_on": groups.matching()} if groups.matching() else {}),
        **(meta or {}),
    }
    return DirectionSet(tensors, groups.node_ids, list(acts.layers), list(acts.positions), list(methods), info)
