"""Per-taxonomy-node refusal directions (difference of means) and their on-disk format.

For every node k, layer l and position p (see `positions.py`):
- `diff_means`: mean over node k's harmful prompts minus the mean over the harmless set;
- `vs_other`:   node k's mean minus the mean of the *other* nodes' means (each node weighted
                equally, so a large node does not dominate) — what is specific to k among harms;
- `residual`:   `diff_means` with its projection on the pooled direction removed — what is left
                of k's direction once the shared refusal direction is taken out.
The pooled direction (every harmful prompt minus harmless) is stored as node `POOLED`.
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
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from refusal_atlas.errors import AtlasError
from refusal_atlas.mechinterp.positions import LAST_INSTRUCTION, Position, parse_position_label, position_label

POOLED = "@pooled"  # '@' cannot occur in a taxonomy id, so this never clashes with a node
METHODS = ("diff_means", "vs_other", "residual")
ROLES = {"harmfulness": LAST_INSTRUCTION, "refusal": -1}
FORMAT_VERSION = 1


@dataclass
class Groups:
    """Prompt indices of the harmless set, of each node, and of harmful prompts with no node."""

    harmless: Tensor
    nodes: dict[str, Tensor]
    unassigned: Tensor

    @classmethod
    def from_labels(cls, nodes: Sequence[str], harmful: Sequence[bool], min_prompts: int = 2) -> Groups:
        if len(nodes) != len(harmful):
            raise AtlasError(f"{len(nodes)} node labels but {len(harmful)} harmful flags")
        harmless = [i for i, h in enumerate(harmful) if not h]
        by_node: dict[str, list[int]] = {}
        unassigned = []
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

        return cls(t(harmless), {k: t(v) for k, v in sorted(by_node.items())}, t(unassigned))

    @property
    def node_ids(self) -> list[str]:
        return list(self.nodes)

    def all_groups(self) -> list[Tensor]:
        """Harmless first, then the nodes in order, then the unassigned harmful prompts."""
        return [self.harmless, *self.nodes.values(), self.unassigned]

    def counts(self) -> dict[str, int]:
        return {"harmless": len(self.harmless), **{k: len(v) for k, v in self.nodes.items()},
                "unassigned_harmful": len(self.unassigned)}


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
    harmless, nodes, unassigned = means[:, 0], means[:, 1:-1], means[:, -1]
    k = nodes.shape[1]
    sizes = torch.tensor([len(v) for v in groups.nodes.values()], dtype=means.dtype)
    n_u = float(len(groups.unassigned))
    shape = (1, k) + (1,) * (nodes.dim() - 2)
    pooled_mean = ((nodes * sizes.reshape(shape)).sum(1) + n_u * unassigned) / (sizes.sum() + n_u)
    pooled = pooled_mean - harmless
    diff = nodes - harmless.unsqueeze(1)
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
        tmp = out / f"directions.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, out / "directions.json")
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
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def compute_directions(acts, nodes: Sequence[str], harmful: Sequence[bool],
                       methods: Sequence[str] = METHODS, meta: dict | None = None) -> DirectionSet:
    """Directions for every node, layer and position of an `Activations` (no noise estimates)."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise AtlasError(f"unknown methods {bad}; choose from {METHODS}")
    groups = Groups.from_labels(nodes, harmful)
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
        **(meta or {}),
    }
    return DirectionSet(tensors, groups.node_ids, list(acts.layers), list(acts.positions), list(methods), info)
