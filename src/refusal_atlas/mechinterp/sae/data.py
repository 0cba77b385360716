"""Activation sources for SAE training, streamed so memory stays flat in the number of rows.

Two inputs: a safetensors file with a tensor `acts [n, d_in]` (read in row slices), or a folder the
capture writes (`capture.json` + `shard-*.safetensors`, each `acts [B, n_layers, n_positions, d]`;
one layer is chosen and its positions become rows). Rows are shuffled inside a bounded buffer with a
seeded order per epoch, so a run is reproducible and never holds the whole data set.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from refusal_atlas.errors import AtlasError

ACTS_KEY = "acts"
CAPTURE_MANIFEST = "capture.json"


@dataclass
class ActivationSource:
    """Where the rows are; `chunks()` yields float32 [m, d_in] blocks in a seeded order."""

    path: Path
    d_in: int
    n_rows: int
    layer: int | None
    kind: str  # "file" or "capture"
    layer_index: int = 0
    shards: tuple[Path, ...] = ()
    chunk_rows: int = 16_384

    def _blocks(self) -> list[tuple[Path, int, int]]:
        if self.kind == "file":
            step = self.chunk_rows
            return [(self.path, s, min(s + step, self.n_rows)) for s in range(0, self.n_rows, step)]
        return [(shard, 0, -1) for shard in self.shards]

    def _read(self, block: tuple[Path, int, int]) -> Tensor:
        path, start, stop = block
        try:
            with safe_open(str(path), framework="pt") as f:
                if self.kind == "file":
                    return f.get_slice(ACTS_KEY)[start:stop].to(torch.float32)
                part = f.get_slice(ACTS_KEY)[:, self.layer_index]
                return part.reshape(-1, part.shape[-1]).to(torch.float32)
        except (SafetensorError, OSError) as exc:
            raise AtlasError(f"{path}: cannot read activations ({exc})") from exc

    def chunks(self, seed: int | None = None) -> Iterator[Tensor]:
        """Every row once: blocks in a seeded order (file order when `seed` is None)."""
        blocks = self._blocks()
        order = (torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed)).tolist()
                 if seed is not None else range(len(blocks)))
        for i in order:
            yield self._read(blocks[i])

    def batches(self, batch_size: int, seed: int, buffer_rows: int = 65_536) -> Iterator[Tensor]:
        """Shuffled batches of one epoch (the last partial batch dropped), buffer of at most `buffer_rows`."""
        gen = torch.Generator().manual_seed(seed)
        buffer: list[Tensor] = []
        held = 0
        for chunk in self.chunks(seed):
            buffer.append(chunk)
            held += chunk.shape[0]
            if held >= buffer_rows:
                rows = torch.cat(buffer)
                rows = rows[torch.randperm(rows.shape[0], generator=gen)]
                n_full = rows.shape[0] // batch_size * batch_size
                yield from rows[:n_full].split(batch_size)
                buffer, held = [rows[n_full:]], rows.shape[0] - n_full
        if held >= batch_size:
            rows = torch.cat(buffer)
            rows = rows[torch.randperm(rows.shape[0], generator=gen)]
            yield from rows[: rows.shape[0] // batch_size * batch_size].split(batch_size)

    def sample(self, n: int) -> Tensor:
        """The first `n` rows in file order (for statistics such as the mean norm)."""
        out: list[Tensor] = []
        got = 0
        for chunk in self.chunks(None):
            out.append(chunk[: n - got])
            got += out[-1].shape[0]
            if got >= n:
                break
        return torch.cat(out)


def open_activations(path: str | Path, layer: int | None = None) -> ActivationSource:
    """An `ActivationSource` for a safetensors file with `acts [n, d_in]` or a capture folder (pick `layer`)."""
    p = Path(path)
    if p.is_dir():
        return _open_capture(p, layer)
    if not p.is_file():
        raise AtlasError(f"{p}: no such activations file or capture folder")
    try:
        with safe_open(str(p), framework="pt") as f:
            if ACTS_KEY not in f.keys():  # noqa: SIM118 - safe_open is not a container
                raise AtlasError(f"{p}: no tensor '{ACTS_KEY}'; expected acts [n, d_in] (found {', '.join(f.keys())})")
            shape = f.get_slice(ACTS_KEY).get_shape()
            meta = f.metadata() or {}
    except SafetensorError as exc:
        raise AtlasError(f"{p}: not a readable safetensors file ({exc})") from exc
    if len(shape) != 2 or shape[0] == 0:
        raise AtlasError(f"{p}: '{ACTS_KEY}' has shape {tuple(shape)}; expected [n, d_in] with n > 0 "
                         "(a capture of several layers: pass its folder and --layer)")
    stored_layer = meta.get("layer")
    file_layer = int(stored_layer) if stored_layer is not None and stored_layer.lstrip("-").isdigit() else None
    return ActivationSource(p, int(shape[1]), int(shape[0]), layer if layer is not None else file_layer, "file")


def _open_capture(folder: Path, layer: int | None) -> ActivationSource:
    manifest = folder / CAPTURE_MANIFEST
    if not manifest.is_file():
        raise AtlasError(f"{folder}: no {CAPTURE_MANIFEST}; pass a capture folder or a safetensors file with acts")
    try:
        meta = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise AtlasError(f"{manifest}: cannot read ({exc})") from exc
    if not meta.get("complete"):
        raise AtlasError(f"{folder}: capture not finished; rerun the capture to complete it")
    layers = [int(x) for x in meta.get("layers", [])]
    if layer is None:
        if len(layers) != 1:
            raise AtlasError(f"{folder}: captured layers {layers}; choose one with --layer")
        layer = layers[0]
    if layer not in layers:
        raise AtlasError(f"{folder}: layer {layer} was not captured; captured layers: {layers}")
    shards = tuple(sorted(folder.glob("shard-*.safetensors")))
    if not shards:
        raise AtlasError(f"{folder}: no shard-*.safetensors files")
    n_rows, d_in = 0, 0
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                shape = f.get_slice(ACTS_KEY).get_shape()
        except SafetensorError as exc:
            raise AtlasError(f"{shard}: not a readable safetensors file ({exc})") from exc
        n_rows += shape[0] * shape[2]
        d_in = shape[-1]
    return ActivationSource(folder, int(d_in), n_rows, layer, "capture", layers.index(layer), shards)
