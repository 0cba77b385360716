"""The TopK trainer: planted-dictionary recovery, determinism, resumption, capture folders, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tests.mechinterp.sae.synthetic import recovered, write_planted

from refusal_atlas.errors import AtlasError
from refusal_atlas.mechinterp.sae import load_sae
from refusal_atlas.mechinterp.sae.data import open_activations
from refusal_atlas.mechinterp.sae.train import CHECKPOINT, TrainSettings, train_sae

FAST = TrainSettings(width=256, k=6, epochs=2, dead_tokens=5_000, aux_k=32, checkpoint_every=20)


@pytest.fixture(scope="module")
def planted_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    path = tmp_path_factory.mktemp("planted") / "acts.safetensors"
    return path, write_planted(path, n=20_000)


def test_recovers_planted_directions(planted_file: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    path, dictionary = planted_file
    sae, metrics = train_sae(open_activations(path), tmp_path / "sae", FAST, progress=False)
    assert recovered(sae.W_dec.detach(), dictionary) >= 0.9
    assert metrics["fvu"] < 0.2 and metrics["l0"] <= 6
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(256), atol=1e-5)
    # a random decoder of the same width recovers almost nothing: the threshold is a real bar
    assert recovered(torch.randn(256, 64), dictionary) < 0.1
    loaded = load_sae(tmp_path / "sae")
    assert loaded.cfg.architecture == "topk" and loaded.cfg.k == 6 and loaded.cfg.hook_layer == 3
    x = open_activations(path).sample(256)  # the saved SAE reads raw (unscaled) activations
    assert float((loaded(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()) < 0.2


def test_deterministic_and_resumable(planted_file: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    path, _ = planted_file
    settings = TrainSettings(**{**FAST.__dict__, "epochs": 1})
    a, _ = train_sae(open_activations(path), tmp_path / "a", settings, progress=False)
    b, _ = train_sae(open_activations(path), tmp_path / "b", settings, progress=False)
    assert torch.equal(a.W_dec, b.W_dec)
    # interrupted after 17 steps (checkpoint at the end), then resumed to the end
    part, m = train_sae(open_activations(path), tmp_path / "c", TrainSettings(**{**settings.__dict__, "max_steps": 17}),
                        progress=False)
    assert m["steps"] == 17 and not m["finished"] and (tmp_path / "c" / CHECKPOINT).is_file()
    assert not torch.equal(part.W_dec, a.W_dec)
    c, m = train_sae(open_activations(path), tmp_path / "c", settings, progress=False)
    assert m["steps"] == a_steps(path, settings)
    assert torch.equal(c.W_dec, a.W_dec) and torch.equal(c.b_enc, a.b_enc)
    assert not (tmp_path / "c" / CHECKPOINT).exists()


def a_steps(path: Path, settings: TrainSettings) -> int:
    return open_activations(path).n_rows // settings.batch_size * settings.epochs


def test_checkpoint_of_other_settings_is_refused(planted_file: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    path, _ = planted_file
    train_sae(open_activations(path), tmp_path / "s", TrainSettings(**{**FAST.__dict__, "max_steps": 3}),
              progress=False)
    with pytest.raises(AtlasError, match="different data or settings"):
        train_sae(open_activations(path), tmp_path / "s", TrainSettings(**{**FAST.__dict__, "k": 5}), progress=False)


def test_trains_from_capture_folder(tmp_path: Path) -> None:
    from refusal_atlas.lm.capture import capture_activations
    from refusal_atlas.lm.testing import tiny_model

    lm = tiny_model("llama")
    prompts = [f"Tell me about item number {i} and why it matters." for i in range(48)]
    capture_activations(lm, prompts, layers=[1, 2], out_dir=tmp_path / "cap", batch_size=8, progress=False)
    with pytest.raises(AtlasError, match="choose one with --layer"):
        open_activations(tmp_path / "cap")
    source = open_activations(tmp_path / "cap", layer=2)
    assert source.n_rows == 48 * 7 and source.d_in == 64  # 7 default positions per prompt
    rows = torch.cat(list(source.chunks(None)))
    assert rows.shape == (48 * 7, 64)
    sae, metrics = train_sae(source, tmp_path / "sae", TrainSettings(width=128, k=8, epochs=3, batch_size=64),
                             progress=False)
    assert sae.cfg.hook_layer == 2 and metrics["fvu"] < 1.0


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(AtlasError, match="no such activations"):
        open_activations(tmp_path / "missing.safetensors")
    save_file({"x": torch.zeros(4, 3)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(AtlasError, match="no tensor 'acts'"):
        open_activations(tmp_path / "wrong.safetensors")
    save_file({"acts": torch.zeros(4, 2, 3)}, str(tmp_path / "3d.safetensors"))
    with pytest.raises(AtlasError, match="expected \\[n, d_in\\]"):
        open_activations(tmp_path / "3d.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(AtlasError, match="not a readable"):
        open_activations(tmp_path / "junk.safetensors")
    save_file({"acts": torch.zeros(10, 3)}, str(tmp_path / "small.safetensors"))
    with pytest.raises(AtlasError, match="fewer than one batch"):
        train_sae(open_activations(tmp_path / "small.safetensors"), tmp_path / "o", progress=False)
