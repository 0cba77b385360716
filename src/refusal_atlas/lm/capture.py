"""Residual-stream capture at chosen layers and template positions, fast and exact.

Why it is fast: forward hooks sit on just the requested blocks and keep only the requested
slices; the hook of the last requested block raises a private exception, so the remaining
blocks, the final norm and the LM head (a vocabulary-sized matmul per token) are never computed;
prompts are bucketed by length so batches carry little padding.
Hooks run after any already on a block, so captures under an intervention are post-intervention.
Why it is exact: left padding with an attention mask *and* mask-derived position ids (GPT-2's
learned positions would otherwise shift), float32 accumulation, and per-prompt positions taken
from the chat template (`positions.py`). Tests check equality with one-prompt-at-a-time
`output_hidden_states` on every test architecture, in float32, bfloat16 and float16, with eager
and SDPA attention.

Large runs stream to `out_dir` as safetensors shards (one per batch) and resume from them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from refusal_atlas.errors import AtlasError
from refusal_atlas.io import atomic_write, atomic_write_json, folder_json
from refusal_atlas.lm.blocks import decoder_blocks, hidden_from_output
from refusal_atlas.lm.generation import length_buckets
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.lm.positions import (
    Position,
    PromptTokens,
    default_positions,
    expand_positions,
    gather_plan,
    parse_position_label,
    position_label,
    tokenize_prompts,
)
from refusal_atlas.lm.prefix import SharedPrefix, plan_prefix

MANIFEST = "capture.json"


class _StopForward(Exception):
    """Raised by the last needed hook: the rest of the forward pass is not needed."""


@dataclass
class Activations:
    """Captured residual stream: `acts[i, j, k]` is prompt i, layer `layers[j]`, position `positions[k]`.

    - `acts`: [n_prompts, len(layers), len(positions), d_model], float32 whatever the model's dtype
      (block outputs are cast as they are captured, so means over many prompts do not lose bits);
    - `layers`: block indices, ascending (block l's output, hidden_states[l + 1] in HF numbering);
    - `positions`: canonical positions (`positions.py`), in the order requested;
    - `n_tokens`: [n_prompts] length of each formatted prompt in tokens;
    - `meta`: provenance (model id, revision, batch size, system prompt), stored with the tensor.
    """

    acts: Tensor
    layers: list[int]
    positions: list[Position]
    n_tokens: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.acts.shape[0]

    @property
    def d_model(self) -> int:
        return int(self.acts.shape[-1])

    def layer_index(self, layer: int) -> int:
        try:
            return self.layers.index(layer)
        except ValueError:
            raise AtlasError(f"layer {layer} was not captured; captured layers: {self.layers}") from None

    def position_index(self, position: Position) -> int:
        p = parse_position_label(position_label(position))
        try:
            return self.positions.index(p)
        except ValueError:
            raise AtlasError(f"position {position!r} was not captured; captured: {self.positions}") from None

    def at(self, layer: int, position: Position) -> Tensor:
        """[n, d_model] activations of every prompt at one layer and position."""
        return self.acts[:, self.layer_index(layer), self.position_index(position)]

    def subset(self, index: Sequence[int] | Tensor) -> Activations:
        idx = torch.as_tensor(index, dtype=torch.long)
        n_tok = [self.n_tokens[i] for i in idx.tolist()] if self.n_tokens else []
        return Activations(self.acts[idx], list(self.layers), list(self.positions), n_tok, dict(self.meta))

    def save(self, path: str | Path) -> None:
        """One safetensors file (atomic), metadata in its header."""
        meta = {"layers": self.layers, "positions": [position_label(p) for p in self.positions], **self.meta}
        tensors = {"acts": self.acts.contiguous(), "n_tokens": torch.tensor(self.n_tokens, dtype=torch.long)}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"refusal_atlas": json.dumps(meta)}))

    @classmethod
    def load(cls, path: str | Path) -> Activations:
        path = Path(path)
        if path.is_dir():
            return load_shards(path)
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["refusal_atlas"])
            acts, n_tokens = f.get_tensor("acts"), f.get_tensor("n_tokens").tolist()
        layers = meta.pop("layers")
        positions = [parse_position_label(p) for p in meta.pop("positions")]
        return cls(acts, layers, positions, n_tokens, meta)


def accepts_position_ids(model: nn.Module) -> bool:
    """Whether the model's forward takes explicit position ids (needed to keep them right under left padding)."""
    try:
        return "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> dict[str, Tensor]:
    """Left-padded `input_ids`, `attention_mask` and mask-derived `position_ids`, each [batch, longest]."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, width - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}


def resolve_layers(lm: LoadedModel, layers: Sequence[int] | None) -> list[int]:
    """Block indices sorted and deduplicated, negative ones counted from the end; out of range is an error."""
    n = lm.n_layers
    if layers is None:
        return list(range(n))
    out = sorted({int(x) + n if int(x) < 0 else int(x) for x in layers})
    bad = [x for x in out if not 0 <= x < n]
    if bad:
        raise AtlasError(f"layers {bad} out of range: {lm.spec} has {n} layers (0..{n - 1})")
    return out


class _Capturer:
    """Forward hooks on the requested blocks, writing slices into a batch buffer."""

    def __init__(self, lm: LoadedModel, layers: list[int], positions: list[Position]) -> None:
        self.blocks = decoder_blocks(lm.model)
        self.layers = layers
        self.positions = positions
        self.last = max(layers)
        self.buffer: Tensor | None = None  # [batch, len(layers), len(positions), d_model] while a batch runs
        self.index = torch.empty((0, 0), dtype=torch.long)  # [batch, n_point]: token column of each point slot
        self.weights: Tensor | None = None  # [batch, width]: the mean_instruction weights, if requested
        self.point_slots: list[int] = []
        self.mean_slot = -1
        self.handles: list[RemovableHandle] = []

    def __enter__(self) -> _Capturer:
        for j, layer in enumerate(self.layers):
            # Appended, not prepended: hooks already on the block (interventions such as ablation or
            # activation addition register with prepend=True) run first, so what we capture is the
            # post-intervention residual stream.
            self.handles.append(self.blocks[layer].register_forward_hook(self._hook(j)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, j: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.buffer is None:  # the shared-prefix pass: nothing to record, stop at the last block
                if self.layers[j] == self.last:
                    raise _StopForward
                return
            hidden = hidden_from_output(output)
            out = self.buffer[:, j]  # [B, n_pos, d]
            if self.index.shape[1]:
                b, n_point = self.index.shape
                idx = self.index.unsqueeze(-1).expand(b, n_point, hidden.shape[-1])
                out[:, self.point_slots] = hidden.gather(1, idx).float()
            if self.weights is not None:
                out[:, self.mean_slot] = torch.bmm(self.weights.unsqueeze(1), hidden.float()).squeeze(1)
            if self.layers[j] == self.last:
                raise _StopForward

        return hook

    def run(self, model: nn.Module, prompts: Sequence[PromptTokens], pad_id: int, use_pos: bool,
            prefix: SharedPrefix | None = None) -> Tensor:
        """Captured slices of one batch, [batch, len(layers), len(positions), d_model] float32 on the CPU."""
        device = next(model.parameters()).device
        inputs: dict[str, Any]
        if prefix is not None:  # run only each prompt's tail; the prefix's keys/values come from the cache
            p = prefix.length
            prompts = [PromptTokens(pt.input_ids[p:], pt.instruction_start - p, pt.instruction_end - p)
                       for pt in prompts]
            inputs = prefix.batch_inputs([pt.input_ids for pt in prompts], pad_id, device)
        else:
            inputs = left_pad([p.input_ids for p in prompts], pad_id)
        width = inputs["input_ids"].shape[1]
        self.index, self.weights, order = gather_plan(prompts, width, self.positions)
        # output slots of the gathered (point) positions, in gather order, and of the mean
        point = sorted((c, k) for k, c in enumerate(order) if c >= 0)
        self.point_slots = [k for _, k in point]
        self.mean_slot = order.index(-1) if -1 in order else -1
        self.index = self.index.to(device)
        if self.weights is not None:
            self.weights = self.weights.to(device)
        if not use_pos:
            inputs.pop("position_ids")
        if prefix is None:
            inputs = {k: v.to(device) for k, v in inputs.items()}
            inputs["use_cache"] = False
        self.buffer = torch.empty(
            (len(prompts), len(self.layers), len(self.positions), self.d_model(model)),
            dtype=torch.float32,
            device=device,
        )
        with contextlib.suppress(_StopForward):
            model(**inputs)
        out, self.buffer = self.buffer, None
        return out.cpu()

    @staticmethod
    def d_model(model: nn.Module) -> int:
        embeddings = model.get_input_embeddings()  # type: ignore[operator]  # PreTrainedModel method
        return int(embeddings.weight.shape[1])


def _tail_needed(positions: Sequence[Position]) -> int:
    """Tokens at the end of every prompt that must run per batch: the furthest point position requested."""
    offsets = [-p for p in positions if isinstance(p, int)]
    return max([1, *offsets])


def _run_key(
    lm: LoadedModel, texts_hash: str, layers: list[int], positions: list[Position], batch_size: int
) -> dict[str, Any]:
    """What a streamed capture folder's shards depend on: a rerun resumes only when all of it matches."""
    return {
        "model_id": lm.model_id,
        "model_revision": lm.revision,
        "prompts_sha256": texts_hash,
        "layers": layers,
        "positions": [position_label(p) for p in positions],
        "batch_size": batch_size,
    }


def _prompts_hash(prompts: Sequence[PromptTokens]) -> str:
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(json.dumps([p.input_ids, p.instruction_start, p.instruction_end]).encode())
    return digest.hexdigest()


def capture_activations(
    lm: LoadedModel,
    instructions: Sequence[str],
    layers: Sequence[int] | None = None,
    positions: Sequence[Position] | None = None,
    *,
    batch_size: int = 32,
    system: str | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    share_prefix: bool = True,
) -> Activations:
    """Capture block outputs for each instruction (chat template applied).

    `layers`: block indices (None = all; negative counts from the end). `positions`: see
    `positions.py` (None = the last 5 post-instruction tokens, last_instruction, mean_instruction).
    With `out_dir`, each batch is written as a safetensors shard as soon as it finishes and a
    rerun with the same inputs skips finished batches. `share_prefix`: run the template's common
    opening once and reuse its keys/values (`prefix.py`); turn it off under an intervention that
    treats positions differently.
    """
    if not instructions:
        raise AtlasError("no instructions to capture")
    layer_list = resolve_layers(lm, layers)
    pos_list = default_positions(lm, system) if positions is None else expand_positions(lm, positions, system)
    prompts = tokenize_prompts(lm, instructions, system=system)
    lengths = [len(p.input_ids) for p in prompts]
    batches = length_buckets(lengths, batch_size)
    key = _run_key(lm, _prompts_hash(prompts), layer_list, pos_list, batch_size)
    shard_dir = _prepare_out_dir(Path(out_dir), key) if out_dir is not None else None

    d = lm.d_model
    acts = torch.empty((len(prompts), len(layer_list), len(pos_list), d), dtype=torch.float32)
    pad_id = lm.tokenizer.pad_token_id
    use_pos = accepts_position_ids(lm.model)
    bar = tqdm(total=len(prompts), desc="capture", unit="prompt", disable=not progress, dynamic_ncols=True)
    n_prefix = plan_prefix([p.input_ids for p in prompts], lm.model, enabled=share_prefix and use_pos,
                           keep_last=_tail_needed(pos_list),
                           max_length=min(p.instruction_start for p in prompts))
    prefix = None
    with _Capturer(lm, layer_list, pos_list) as cap, torch.inference_mode():
        for b, idx in enumerate(batches):
            shard = shard_dir / f"shard-{b:06d}.safetensors" if shard_dir is not None else None
            if shard is not None and shard.is_file():
                with safe_open(str(shard), framework="pt") as f:
                    acts[torch.as_tensor(f.get_tensor("index"))] = f.get_tensor("acts")
            else:
                if n_prefix and prefix is None:
                    prefix = SharedPrefix.build(lm.model, prompts[0].input_ids[:n_prefix], stop=_StopForward)
                out = cap.run(lm.model, [prompts[i] for i in idx], pad_id, use_pos, prefix)
                acts[torch.as_tensor(idx)] = out
                if shard is not None:
                    tensors = {"acts": out.contiguous(), "index": torch.as_tensor(idx, dtype=torch.long)}
                    atomic_write(shard, functools.partial(_save_tensors, tensors))
            bar.update(len(idx))
    bar.close()
    meta = {**lm.provenance(), "batch_size": batch_size, "system": system}
    result = Activations(acts, layer_list, pos_list, lengths, meta)
    if shard_dir is not None:
        _write_json(shard_dir / MANIFEST, {**key, "complete": True, "n_prompts": len(prompts),
                                           "n_batches": len(batches), "n_tokens": lengths, **meta})
    return result


def _save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    save_file(tensors, str(path))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_json(path, data, indent=1, sort_keys=False)


def _prepare_out_dir(out_dir: Path, key: dict[str, Any]) -> Path:
    """Create or reuse a shard folder; shards from a different run configuration are an error."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / MANIFEST
    if manifest.is_file():
        old = json.loads(manifest.read_text())
        changed = [k for k, v in key.items() if old.get(k) != v]
        if changed:
            raise AtlasError(
                f"{manifest}: existing shards were captured with different {', '.join(changed)}; "
                "use another output folder or delete this one"
            )
        return out_dir
    if any(out_dir.glob("shard-*.safetensors")):
        raise AtlasError(f"{out_dir}: shards without {MANIFEST}; delete them or use another folder")
    _write_json(manifest, {**key, "complete": False})
    return out_dir


def load_shards(out_dir: str | Path) -> Activations:
    """Reassemble a finished streamed capture from its folder."""
    out_dir = Path(out_dir)
    meta = folder_json(out_dir, MANIFEST, f"no {MANIFEST}; not a capture folder")
    if not meta.get("complete"):
        raise AtlasError(f"{out_dir}: capture not finished; rerun the same command to resume it")
    shards = sorted(out_dir.glob("shard-*.safetensors"))
    acts: Tensor | None = None
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            part, index = f.get_tensor("acts"), f.get_tensor("index")
        if acts is None:
            acts = torch.empty((meta["n_prompts"], *part.shape[1:]), dtype=torch.float32)
        acts[index] = part
    if acts is None:
        raise AtlasError(f"{out_dir}: no shards")
    layers = meta.pop("layers")
    positions = [parse_position_label(p) for p in meta.pop("positions")]
    n_tokens = meta.pop("n_tokens", [])
    return Activations(acts, layers, positions, n_tokens, meta)
