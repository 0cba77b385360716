"""Causal interventions on the residual stream: directional ablation, activation addition, and
weight orthogonalization (Arditi et al. 2024), for any decoder architecture.

Hook interventions are `Intervention` objects: use one as a context manager (`with ablation(...):`)
or pass it as the `hooks=` factory of `generation.generate` (calling it returns a fresh context).
Every hook is registered with `prepend=True` so that the `output_hidden_states` recorder of
transformers (itself a forward hook) sees the post-intervention values.

Residual-stream conventions (see blocks.py): "layer l" is the output of decoder block l. Ablation
removes the unit direction at every chosen block's input and output and at each *residual write
point* inside the block (the module whose output is added to the residual: attention-out and
MLP-down, or the norm after them in architectures with post-sublayer norms such as Gemma 2), so
the stream between attention and MLP is clean too. That makes hook ablation exactly equal to
weight orthogonalization wherever the latter is possible.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.blocks import decoder_blocks, hidden_from_output, replace_hidden
from refusal_atlas.lm.models import LoadedModel

try:  # GPT-2 style "Conv1D" is a Linear with a transposed weight ([in, out]).
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old transformers
    Conv1D = ()  # type: ignore[assignment,misc]


# --------------------------------------------------------------------------------------------
# Small tensor helpers
# --------------------------------------------------------------------------------------------


def orthonormal_rows(vectors: Tensor) -> Tensor:
    """An orthonormal basis [k, d] (float32) of the span of the rows of `vectors`; rank-deficient input is an error."""
    v = vectors.detach().to(torch.float32)
    q, r = torch.linalg.qr(v.T)
    if not torch.isfinite(r).all() or (r.diagonal().abs() <= 1e-6 * r.diagonal().abs().max().clamp_min(1e-30)).any():
        raise AtlasError("subspace ablation: the vectors are linearly dependent or non-finite")
    return q.T.contiguous()


def unit(direction: Tensor) -> Tensor:
    """The direction scaled to unit norm (float32); a zero vector is an error, not a silent no-op."""
    d = direction.detach().to(torch.float32).flatten()
    norm = d.norm()
    if not torch.isfinite(norm) or norm <= 0:
        raise AtlasError("direction has zero or non-finite norm; cannot ablate or orthogonalize along it")
    return d / norm


def project_out(x: Tensor, r_unit: Tensor) -> Tensor:
    """x minus its component along the unit vector r (last dimension), computed in x's dtype."""
    r = r_unit.to(device=x.device, dtype=x.dtype)
    return x - (x @ r).unsqueeze(-1) * r


# --------------------------------------------------------------------------------------------
# The Intervention object
# --------------------------------------------------------------------------------------------


class Intervention:
    """A set of hooks that can be entered as a context manager or used as a `hooks=` factory.

    `install` registers the hooks and returns their handles; they are removed on exit, even on error.
    `per_position`: the hooks transform every position the same way, independent of where it sits
    in the sequence (true of ablation and addition); only then may a shared prompt prefix be run
    once and reused (`prefix.py`).
    """

    def __init__(self, install: Callable[[], list[RemovableHandle]], description: str = "",
                 per_position: bool = True) -> None:
        self._install = install
        self._handles: list[list[RemovableHandle]] = []
        self.description = description
        self.per_position = per_position

    def __call__(self) -> Intervention:
        # A fresh, independent context (generation enters one per batch).
        return Intervention(self._install, self.description, self.per_position)

    def __enter__(self) -> Intervention:
        self._handles.append(self._install())
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles.pop():
            handle.remove()

    def __repr__(self) -> str:
        return f"Intervention({self.description})"


def compose(*interventions: Intervention | None) -> Intervention:
    """Several interventions applied together (None entries are skipped)."""
    parts = [i for i in interventions if i is not None]

    def install() -> list[RemovableHandle]:
        handles: list[RemovableHandle] = []
        for part in parts:
            handles.extend(part._install())
        return handles

    return Intervention(install, " + ".join(p.description for p in parts), all(p.per_position for p in parts))


def no_intervention() -> Intervention:
    return Intervention(list, "none")


# --------------------------------------------------------------------------------------------
# Where the residual stream is written
# --------------------------------------------------------------------------------------------


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def _linear_out_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    return int(cast(Tensor, module.weight).shape[1])  # Conv1D: weight [in, out]


@dataclass
class ResidualWriters:
    """The modules that write into the residual stream, found by tracing one forward pass.

    `writers[b]` are block b's linear maps whose output is added to the residual (attention-out,
    MLP-down); `write_points[b]` are the modules whose *output* is what gets added (the writer
    itself, or a post-sublayer norm after it); `embeddings` are the input embeddings (token and
    absolute position) that start the stream.
    """

    embeddings: list[nn.Module]
    writers: list[list[nn.Module]]
    write_points: list[list[nn.Module]]
    post_norms: list[str] = field(default_factory=list)  # names of post-sublayer norms (Gemma 2 style)

    @property
    def has_post_norms(self) -> bool:
        return bool(self.post_norms)


def _probe_inputs(model: nn.Module) -> dict[str, Tensor]:
    device = next(model.parameters()).device
    vocab = cast(Any, model).get_input_embeddings().weight.shape[0]  # a transformers PreTrainedModel method
    ids = torch.arange(1, 6, device=device).remainder(vocab).unsqueeze(0)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def residual_writers(model: nn.Module) -> ResidualWriters:
    """Find the residual writers architecture-agnostically (cached on the model).

    Within each block, each direct child that contains linear maps (the attention and MLP
    sub-modules) writes to the residual through the *last* linear map it calls whose output width
    is d_model (o_proj / dense / c_proj / down_proj / dense_4h_to_h, ...). If a parameterised
    non-linear module (a norm) then consumes exactly that output, it is a post-sublayer norm and
    the write point moves to it.
    """
    cached = getattr(model, "_refusal_atlas_writers", None)
    if cached is not None:
        return cached
    blocks = decoder_blocks(model)
    d_model = int(cast(Any, model).get_input_embeddings().weight.shape[1])  # a transformers PreTrainedModel method
    # (block, name, module, in_keys, out_key)
    calls: list[tuple[int, str, nn.Module, tuple[tuple[Any, ...], ...], tuple[Any, ...] | None]] = []
    handles: list[RemovableHandle] = []
    keep_alive: list[object] = []  # so no freed tensor's memory is reused and mistaken for another

    def key(t: object) -> tuple | None:
        return (t.data_ptr(), tuple(t.shape)) if isinstance(t, Tensor) else None

    for b, block in enumerate(blocks):
        for name, module in block.named_modules():
            if not name or list(module.children()):
                continue  # leaves only

            def hook(mod: nn.Module, args: tuple[Any, ...], out: Any, b: int = b, name: str = name) -> None:
                ins = tuple(k for k in (key(a) for a in args) if k is not None)
                keep_alive.append(out)
                calls.append((b, name, mod, ins, key(hidden_from_output(out))))

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(**_probe_inputs(model))
    finally:
        for h in handles:
            h.remove()

    writers: list[list[nn.Module]] = [[] for _ in blocks]
    points: list[list[nn.Module]] = [[] for _ in blocks]
    post_norms: list[str] = []
    for b in range(len(blocks)):
        block_calls = [c for c in calls if c[0] == b]
        last_in_child: dict[str, int] = {}
        for i, (_, name, mod, _, _) in enumerate(block_calls):
            if _is_linear(mod) and _linear_out_features(mod) == d_model:
                last_in_child[name.split(".")[0]] = i
        for i in sorted(last_in_child.values()):
            _, name, mod, _, out_key = block_calls[i]
            writers[b].append(mod)
            point = mod
            for _, later_name, later, ins, _ in block_calls[i + 1 :]:
                if out_key in ins and not _is_linear(later) and any(True for _ in later.parameters()):
                    point = later
                    post_norms.append(f"block {b}: {later_name} after {name}")
                    break
            points[b].append(point)
        if not writers[b]:
            raise AtlasError(f"{type(model).__name__}: found no residual writers in decoder block {b}")

    out_emb = cast(Any, model).get_output_embeddings()  # a transformers PreTrainedModel method
    block_params = {id(p) for p in blocks.parameters()}
    embeddings: list[nn.Module] = [
        m
        for m in model.modules()
        if isinstance(m, nn.Embedding)
        and m.embedding_dim == d_model
        and id(m.weight) not in block_params
        and (out_emb is None or m is not out_emb)
    ]
    result = ResidualWriters(embeddings, writers, points, post_norms)
    object.__setattr__(model, "_refusal_atlas_writers", result)
    return result


# --------------------------------------------------------------------------------------------
# Directional ablation and activation addition
# --------------------------------------------------------------------------------------------


def _layer_list(model: nn.Module, layers: Iterable[int] | None) -> list[int]:
    n = len(decoder_blocks(model))
    if layers is None:
        return list(range(n))
    out = sorted({int(x) % n if int(x) < 0 else int(x) for x in layers})
    bad = [x for x in out if not 0 <= x < n]
    if bad:
        raise AtlasError(f"layer(s) {bad} out of range: the model has {n} decoder blocks (0..{n - 1})")
    return out


def _input_pre_hook(fn: Callable[[Tensor], Tensor]) -> Callable[..., Any]:
    def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        if "hidden_states" in kwargs:
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = fn(kwargs["hidden_states"])
            return args, kwargs
        return None

    return pre_hook


def _output_hook(fn: Callable[[Tensor], Tensor]) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return replace_hidden(output, fn(hidden_from_output(output)))

    return hook


def ablation(
    model: nn.Module,
    direction: Tensor,
    layers: Iterable[int] | None = None,
    *,
    write_points: bool = True,
) -> Intervention:
    """Remove the direction's component from the residual stream (all layers by default).

    At each chosen block: its input (pre-hook), its output, and (``write_points``) the outputs of
    its attention/MLP write points, so no sub-layer ever reads or adds the direction.
    A 2-D `direction` [k, d] removes the subspace its rows span (a refusal "cone").
    """
    if direction.dim() == 2 and direction.shape[0] > 1:
        basis = orthonormal_rows(direction)

        def fn(x: Tensor) -> Tensor:
            q = basis.to(device=x.device, dtype=x.dtype)
            return x - (x @ q.T) @ q
    else:
        r = unit(direction)

        def fn(x: Tensor) -> Tensor:
            return project_out(x, r)

    chosen = _layer_list(model, layers)
    blocks = decoder_blocks(model)
    points = residual_writers(model).write_points if write_points else [[] for _ in blocks]

    def install() -> list[RemovableHandle]:
        handles = []
        for layer in chosen:
            block = blocks[layer]
            handles.append(block.register_forward_pre_hook(_input_pre_hook(fn), with_kwargs=True, prepend=True))
            for point in points[layer]:
                handles.append(point.register_forward_hook(_output_hook(fn), prepend=True))
            handles.append(block.register_forward_hook(_output_hook(fn), prepend=True))
        return handles

    where = "all layers" if layers is None else f"layers {chosen}"
    return Intervention(install, f"ablate ({where})")


def addition(
    model: nn.Module,
    vector: Tensor,
    layer: int,
    *,
    coeff: float = 1.0,
    at: str = "output",
) -> Intervention:
    """Add ``coeff * vector`` (raw, natural norm) to the residual stream at one layer, every position.

    ``at="output"`` adds to block ``layer``'s output (our layer convention, hidden_states[layer+1]);
    ``at="input"`` adds to its input (Arditi's resid_pre).
    """
    (layer,) = _layer_list(model, [layer])
    block = decoder_blocks(model)[layer]
    v = vector.detach().to(torch.float32).flatten()
    if at not in ("output", "input"):
        raise AtlasError(f"addition: at={at!r}; use 'output' or 'input'")

    def fn(x: Tensor) -> Tensor:
        return x + coeff * v.to(device=x.device, dtype=x.dtype)

    def install() -> list[RemovableHandle]:
        if at == "input":
            return [block.register_forward_pre_hook(_input_pre_hook(fn), with_kwargs=True, prepend=True)]
        return [block.register_forward_hook(_output_hook(fn), prepend=True)]

    return Intervention(install, f"add {coeff:g}×v at layer {layer} {at}")


# --------------------------------------------------------------------------------------------
# Weight orthogonalization
# --------------------------------------------------------------------------------------------


def _untie_output_embeddings(model: nn.Module) -> None:
    """Give the LM head its own weight: orthogonalizing the input embedding must not edit it."""
    hf = cast(Any, model)  # a transformers PreTrainedModel (nn.Module's stubs type attributes as Tensor | Module)
    out_emb = hf.get_output_embeddings()
    in_emb = hf.get_input_embeddings()
    if out_emb is None or out_emb.weight is not in_emb.weight:
        return
    out_emb.weight = nn.Parameter(in_emb.weight.detach().clone(), requires_grad=in_emb.weight.requires_grad)
    for cfg in {id(c): c for c in (hf.config, hf.config.get_text_config())}.values():
        cfg.tie_word_embeddings = False


@torch.no_grad()
def orthogonalize_weights(model: nn.Module, direction: Tensor) -> nn.Module:
    """Edit the model in place so that no embedding or residual writer can write along the direction.

    Equivalent to `ablation(model, direction)` (all layers), without hooks: the edited model can be
    saved and loaded by any tool. Raises for architectures with post-sublayer norms (Gemma 2/3),
    where the norm after o_proj/down_proj re-introduces the direction and no weight edit is exact.
    """
    found = residual_writers(model)
    if found.has_post_norms:
        raise AtlasError(
            f"{type(model).__name__}: weight orthogonalization is not exact for architectures with "
            f"post-sublayer norms ({found.post_norms[0]}, ...); use hook-based `ablation` instead"
        )
    r = unit(direction)
    _untie_output_embeddings(model)
    for emb in found.embeddings:
        w = cast(Tensor, emb.weight)
        rr = r.to(w.device, w.dtype)
        w.sub_((w @ rr).unsqueeze(1) * rr)
    for block_writers in found.writers:
        for mod in block_writers:
            w = cast(Tensor, mod.weight)
            rr = r.to(w.device, w.dtype)
            if isinstance(mod, nn.Linear):  # [out=d, in]
                w.sub_(rr.unsqueeze(1) * (rr @ w).unsqueeze(0))
            else:  # Conv1D [in, out=d]
                w.sub_((w @ rr).unsqueeze(1) * rr.unsqueeze(0))
            if getattr(mod, "bias", None) is not None:
                b = cast(Tensor, mod.bias)
                b.sub_((b @ rr) * rr)
    return model


def save_orthogonalized(lm: LoadedModel, direction: Tensor, out_dir: str | Path) -> Path:
    """Orthogonalize a copy of `lm`'s model along `direction` and save it (safetensors + tokenizer)."""

    out = Path(out_dir)
    model = copy.deepcopy(lm.model)
    if hasattr(model, "_refusal_atlas_writers"):
        object.__delattr__(model, "_refusal_atlas_writers")
    if hasattr(model, "_refusal_atlas_blocks"):
        object.__delattr__(model, "_refusal_atlas_blocks")
    orthogonalize_weights(model, direction)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    lm.tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------------------------
# Convenience: run a forward pass under an intervention
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def maybe(intervention: Intervention | None) -> Iterator[None]:
    """Enter the intervention if there is one."""
    if intervention is None:
        yield
    else:
        with intervention():
            yield


def layer_subset(n_layers: int, count: int, max_fraction: float = 1.0) -> list[int]:
    """`count` evenly spaced layers in [0, max_fraction·n) — candidate grids for selection/steering."""
    top = max(1, int(n_layers * max_fraction))
    if count >= top:
        return list(range(top))
    step = top / count
    return sorted({int(i * step + step / 2) for i in range(count)})


__all__: Sequence[str] = (
    "Intervention",
    "ResidualWriters",
    "ablation",
    "addition",
    "compose",
    "layer_subset",
    "maybe",
    "no_intervention",
    "orthogonalize_weights",
    "project_out",
    "residual_writers",
    "save_orthogonalized",
    "unit",
)
