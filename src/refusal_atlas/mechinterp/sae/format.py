"""SAELens's on-disk format, both ways: `cfg.json` + `sae_weights.safetensors` in one folder.

Also read: configs written before SAELens 6 (`hook_point`, `activation_fn_str`, top-level model and
hook fields) and a Gemma Scope `params.npz` folder (JumpReLU, no config). Every problem with a
folder is one `AtlasError` naming the file and what to do.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from refusal_atlas.errors import AtlasError
from refusal_atlas.io import atomic_write, atomic_write_json
from refusal_atlas.mechinterp.sae.model import ARCHITECTURES, NORMALIZATIONS, SAEConfig, SparseAutoencoder

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
GEMMA_SCOPE_FILE = "params.npz"
# top-level keys of pre-6 configs that SAELens 6 keeps under `metadata`
_METADATA_KEYS = ("model_name", "hook_name", "hook_layer", "hook_head_index", "model_class_name",
                  "context_size", "dataset_path", "prepend_bos", "model_from_pretrained_kwargs",
                  "sae_lens_training_version", "neuronpedia_id", "seqpos_slice", "exclude_special_tokens")


def _config_from_dict(raw: dict[str, Any], where: Path) -> SAEConfig:
    data = dict(raw)
    if "hook_point" in data and "hook_name" not in data:
        data["hook_name"] = data.pop("hook_point")
    if "hook_point_layer" in data and "hook_layer" not in data:
        data["hook_layer"] = data.pop("hook_point_layer")
    act = data.get("activation_fn_str", data.get("activation_fn"))
    kwargs = data.get("activation_fn_kwargs") or {}
    arch = data.get("architecture")
    if arch is None:
        arch = "topk" if act == "topk" else "standard"
    if arch == "standard" and act == "topk" and kwargs.get("k") is not None:
        arch = "topk"
    if arch not in ARCHITECTURES:
        raise AtlasError(f"{where}: architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    missing = [key for key in ("d_in", "d_sae") if not isinstance(data.get(key), int)]
    if missing:
        raise AtlasError(f"{where}: missing or non-integer {', '.join(missing)}; "
                         "an SAELens cfg.json needs d_in and d_sae")
    norm = data.get("normalize_activations") or "none"
    if norm not in NORMALIZATIONS:
        raise AtlasError(f"{where}: normalize_activations={norm!r} is not supported; fold it into the weights "
                         f"first (supported: {', '.join(NORMALIZATIONS)})")
    if data.get("reshape_activations", "none") not in ("none", None):
        raise AtlasError(f"{where}: reshape_activations={data['reshape_activations']!r} (attention hook_z SAEs) "
                         "is not supported; use a residual-stream SAE")
    k = data.get("k", kwargs.get("k"))
    if arch == "topk" and (not isinstance(k, int) or not 0 < k <= data["d_sae"]):
        raise AtlasError(f"{where}: a topk SAE needs an integer k between 1 and d_sae, got {k!r}")
    metadata = dict(data.get("metadata") or {})
    for key in _METADATA_KEYS:
        if key in data and key not in metadata:
            metadata[key] = data[key]
    known = {"architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
             "k", "rescale_acts_by_decoder_norm", "metadata", "reshape_activations", *_METADATA_KEYS}
    return SAEConfig(
        architecture=arch,
        d_in=data["d_in"],
        d_sae=data["d_sae"],
        dtype=str(data.get("dtype", "float32")),
        device=str(data.get("device", "cpu")),
        apply_b_dec_to_input=bool(data.get("apply_b_dec_to_input", True)),
        normalize_activations=norm,
        k=k if arch == "topk" else None,
        rescale_acts_by_decoder_norm=bool(data.get("rescale_acts_by_decoder_norm", False)),
        metadata=metadata,
        extra={key: value for key, value in data.items() if key not in known},
    )


def _check_shapes(cfg: SAEConfig, weights: dict[str, Tensor], where: Path) -> None:
    d_in, d_sae = cfg.d_in, cfg.d_sae
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    if cfg.architecture == "jumprelu":
        expected["threshold"] = (d_sae,)
    for name, shape in expected.items():
        if name not in weights:
            raise AtlasError(f"{where}: tensor {name} missing; a {cfg.architecture} SAE needs "
                             f"{', '.join(expected)}")
        if tuple(weights[name].shape) != shape:
            raise AtlasError(f"{where}: {name} has shape {tuple(weights[name].shape)}, expected {shape} "
                             f"from d_in={d_in}, d_sae={d_sae}")
        if not torch.isfinite(weights[name].float()).all():
            raise AtlasError(f"{where}: {name} contains NaN or infinite values")


def _load_gemma_scope(folder: Path) -> SparseAutoencoder:
    path = folder / GEMMA_SCOPE_FILE
    try:
        with np.load(path, allow_pickle=False) as npz:
            weights = {k: torch.from_numpy(np.asarray(npz[k], dtype=np.float32)) for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise AtlasError(f"{path}: not a readable .npz file ({exc})") from exc
    if "W_enc" not in weights or weights["W_enc"].dim() != 2:
        raise AtlasError(f"{path}: no 2-D W_enc; expected Gemma Scope's W_enc, W_dec, b_enc, b_dec, threshold")
    d_in, d_sae = weights["W_enc"].shape
    cfg = SAEConfig("jumprelu", d_in=int(d_in), d_sae=int(d_sae), apply_b_dec_to_input=False,
                    metadata={"source": "gemma-scope params.npz"})
    _check_shapes(cfg, weights, path)
    return SparseAutoencoder(cfg, weights)


def load_sae(path: str | Path) -> SparseAutoencoder:
    """An SAE from a folder in SAELens's format (or a Gemma Scope `params.npz` folder), float32 on the CPU."""
    folder = Path(path)
    if folder.is_file() and folder.name in (CFG_FILE, WEIGHTS_FILE, GEMMA_SCOPE_FILE):
        folder = folder.parent
    if not folder.is_dir():
        raise AtlasError(f"{folder}: no such SAE folder (expected a folder with {CFG_FILE} and {WEIGHTS_FILE})")
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file():
        if (folder / GEMMA_SCOPE_FILE).is_file():
            return _load_gemma_scope(folder)
        raise AtlasError(f"{folder}: no {CFG_FILE}; an SAE folder holds {CFG_FILE} and {WEIGHTS_FILE} "
                         "(SAELens's SAE.save_model writes both)")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise AtlasError(f"{cfg_path}: cannot read ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise AtlasError(f"{cfg_path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
    if not isinstance(raw, dict):
        raise AtlasError(f"{cfg_path}: expected a JSON object")
    cfg = _config_from_dict(raw, cfg_path)
    if not weights_path.is_file():
        raise AtlasError(f"{folder}: no {WEIGHTS_FILE} beside {CFG_FILE}")
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AtlasError(f"{weights_path}: not a readable safetensors file ({exc})") from exc
    _check_shapes(cfg, weights, weights_path)
    return SparseAutoencoder(cfg, weights)


def save_sae(sae: SparseAutoencoder, path: str | Path) -> Path:
    """Write `cfg.json` and `sae_weights.safetensors` (float32) into the folder; SAELens loads the result."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise AtlasError(f"{folder}: exists and is not a folder; choose another output path")
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.to(torch.float32).cpu() for k, v in sae.weights().items()}
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(weights, str(tmp)))
    cfg = sae.cfg.to_dict()
    cfg["dtype"], cfg["device"] = "float32", "cpu"
    # SAELens reads the version to decide whether a config needs its pre-6 conversion
    cfg["metadata"].setdefault("sae_lens_version", "6.0.0")
    cfg["metadata"].setdefault("sae_lens_training_version", None)
    atomic_write_json(folder / CFG_FILE, cfg, sort_keys=False)
    return folder


def from_sae_lens(sae: Any) -> SparseAutoencoder:
    """Convert an in-memory SAELens `SAE` (standard, topk, jumprelu) without a trip through disk."""
    raw = sae.cfg.to_dict()
    weights = {k: v.detach().float().cpu() for k, v in sae.state_dict().items()}
    cfg = _config_from_dict(raw, Path("<sae_lens SAE>"))
    _check_shapes(cfg, weights, Path("<sae_lens SAE>"))
    return SparseAutoencoder(cfg, {k: weights[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
                                   if k in weights})


def load_release(release: str, sae_id: str) -> SparseAutoencoder:
    """A SAELens release (e.g. a Gemma Scope id) through `sae_lens` itself: this one may download."""
    try:  # optional heavy dependency, only for users naming a hub release
        from sae_lens import SAE
    except ImportError as exc:
        raise AtlasError("loading an SAE release needs the optional package sae-lens (pip install sae-lens)") from exc
    try:
        sae = SAE.from_pretrained(release, sae_id, device="cpu")
    except Exception as exc:  # SAELens raises many kinds (network, unknown id): one line for the user
        raise AtlasError(f"SAELens could not load {release}/{sae_id}: {exc}") from exc
    return from_sae_lens(sae)
