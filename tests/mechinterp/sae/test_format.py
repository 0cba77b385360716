"""SAELens interoperability (both ways, each architecture) and one-line errors for bad folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from refusal_atlas.errors import AtlasError
from refusal_atlas.mechinterp.sae import SAEConfig, SparseAutoencoder, load_sae, save_sae

D_IN, D_SAE = 24, 96


def _random_weights(arch: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5,
         "W_dec": torch.randn(D_SAE, D_IN, generator=g) / D_IN**0.5,
         "b_enc": 0.1 * torch.randn(D_SAE, generator=g), "b_dec": 0.3 * torch.randn(D_IN, generator=g)}
    if arch == "jumprelu":
        w["threshold"] = 0.2 * torch.rand(D_SAE, generator=g)
    return w


def _sae_lens_sae(arch: str, seed: int, **cfg_kw: object):  # returns a sae_lens SAE
    saes = pytest.importorskip("sae_lens.saes", reason="sae-lens is not installed (pip install sae-lens)")
    classes = {"standard": (saes.StandardSAE, saes.StandardSAEConfig),
               "topk": (saes.TopKSAE, saes.TopKSAEConfig),
               "jumprelu": (saes.JumpReLUSAE, saes.JumpReLUSAEConfig)}
    cls, cfg_cls = classes[arch]
    sae = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **cfg_kw))
    state = _random_weights(arch, seed)
    sae.load_state_dict(state)
    return sae


CASES = [("standard", {}), ("standard", {"apply_b_dec_to_input": False, "normalize_activations": "layer_norm"}),
         ("topk", {"k": 7}), ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True}),
         ("jumprelu", {}), ("jumprelu", {"normalize_activations": "constant_norm_rescale"})]


@pytest.mark.parametrize(("arch", "kw"), CASES)
def test_sae_saved_by_sae_lens_matches_here(tmp_path: Path, arch: str, kw: dict) -> None:
    theirs = _sae_lens_sae(arch, seed=1, **kw)
    theirs.save_model(tmp_path / "sae")
    ours = load_sae(tmp_path / "sae")
    assert ours.cfg.architecture == arch
    x = 2.0 * torch.randn(64, D_IN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        f_theirs, f_ours = theirs.encode(x), ours.encode(x)
        assert (f_theirs > 0).sum() > 0  # the comparison is not between two all-zero tensors
        assert torch.allclose(f_ours, f_theirs, atol=1e-5, rtol=0)
        if kw.get("normalize_activations", "none") == "none":  # decode alone needs no input
            assert torch.allclose(ours.decode(f_theirs), theirs.decode(f_theirs), atol=1e-5, rtol=0)
        assert torch.allclose(ours(x), theirs(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("arch", "kw"), CASES)
def test_ours_loads_in_sae_lens(tmp_path: Path, arch: str, kw: dict) -> None:
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install sae-lens)")
    cfg = SAEConfig(arch, D_IN, D_SAE, metadata={"model_name": "tiny", "hook_name": "blocks.2.hook_resid_post",
                                                 "hook_layer": 2}, **kw)
    ours = SparseAutoencoder(cfg, _random_weights(arch, seed=3))
    save_sae(ours, tmp_path / "ours")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "ours")
    assert theirs.cfg.architecture() == arch
    assert theirs.cfg.metadata.hook_layer == 2
    x = 2.0 * torch.randn(64, D_IN, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(theirs.encode(x), ours.encode(x), atol=1e-5, rtol=0)
        assert torch.allclose(theirs(x), ours(x), atol=1e-5, rtol=0)
    again = load_sae(tmp_path / "ours")
    assert again.cfg.metadata["hook_layer"] == 2 and again.cfg.k == ours.cfg.k


def test_roundtrip_without_sae_lens(tmp_path: Path) -> None:
    cfg = SAEConfig("jumprelu", D_IN, D_SAE, metadata={"hook_layer": 1})
    sae = SparseAutoencoder(cfg, _random_weights("jumprelu", 5))
    save_sae(sae, tmp_path / "s")
    back = load_sae(tmp_path / "s" / "cfg.json")
    for name, value in sae.weights().items():
        assert torch.equal(back.weights()[name], value)


def test_gemma_scope_npz(tmp_path: Path) -> None:
    import numpy as np

    w = _random_weights("jumprelu", 6)
    np.savez(tmp_path / "params.npz", **{k: v.numpy() for k, v in w.items()})
    sae = load_sae(tmp_path)
    x = torch.randn(8, D_IN)
    pre = x @ w["W_enc"] + w["b_enc"]  # Gemma Scope: no b_dec subtraction before encoding
    expected = pre.relu() * (pre > w["threshold"])
    assert torch.allclose(sae.encode(x), expected, atol=1e-6)


def _write(folder: Path, cfg: object, weights: dict[str, torch.Tensor] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    if weights is not None:
        save_file(weights, str(folder / "sae_weights.safetensors"))
    return folder


@pytest.mark.parametrize(("cfg", "weights", "message"), [
    (None, None, "no such SAE folder"),
    ("{bad json", None, "invalid JSON"),
    ({"architecture": "gated", "d_in": D_IN, "d_sae": D_SAE}, None, "not supported"),
    ({"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE}, None, "needs an integer k"),
    ({"architecture": "standard", "d_sae": D_SAE}, None, "d_in"),
    ({"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE}, None, "no sae_weights.safetensors"),
    ({"architecture": "standard", "d_in": D_IN + 1, "d_sae": D_SAE}, "std", "has shape"),
    ({"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE}, "std", "threshold missing"),
])
def test_bad_folders_one_line(tmp_path: Path, cfg: object, weights: str | None, message: str) -> None:
    folder = tmp_path / "sae"
    if cfg is not None:
        _write(folder, cfg, _random_weights("standard", 0) if weights else None)
    with pytest.raises(AtlasError) as info:
        load_sae(folder)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_not_safetensors(tmp_path: Path) -> None:
    folder = _write(tmp_path / "sae", {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE})
    (folder / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(AtlasError, match="not a readable safetensors"):
        load_sae(folder)
