"""Ground truth: planted directions with known cosines are recovered, with noise floors that match.

Two settings: synthetic activations (isotropic Gaussian noise, analytic expectations), and a tiny
model's residual stream, where a hook adds each node's planted vector (a shared component plus a
node-specific part) and per-prompt noise to block 2's output.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from refusal_atlas.lm.blocks import decoder_blocks, hidden_from_output
from refusal_atlas.lm.capture import Activations, capture_activations
from refusal_atlas.lm.testing import tiny_model
from refusal_atlas.mechinterp.directions import Groups
from refusal_atlas.mechinterp.extract import extract_directions
from refusal_atlas.mechinterp.geometry import spectrum
from refusal_atlas.mechinterp.noise import cosine_report

SHARES = (0.95, 0.8, 0.6, 0.3)  # each node's loading on the shared component


def planted_vectors(d: int, norm: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Node vectors a_k * shared + sqrt(1 - a_k^2) * own_k (orthonormal parts), and their true cosines."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, len(SHARES) + 1, generator=gen))
    shared, own = q[:, 0], q[:, 1:].T
    a = torch.tensor(SHARES).unsqueeze(1)
    vecs = norm * (a * shared + (1 - a**2).sqrt() * own)
    unit = vecs / vecs.norm(dim=1, keepdim=True)
    return vecs, unit @ unit.T


def expected_split_half(signal: float, noise_k: float, noise_h: float) -> float:
    """Half-sample directions carry noise power 2 (tr Σ_k / n_k + tr Σ_h / n_h)."""
    return signal / (signal + 2 * (noise_k + noise_h))


def check_recovery(ds, true_cos: torch.Tensor, tol: float = 0.05) -> float:
    """Every pair's noise-corrected cosine within tol of the planted one; returns the worst error."""
    worst = 0.0
    for row in cosine_report(ds, ds.layers[0], -1):
        i, j = int(row.a[1:]), int(row.b[1:])
        err = abs(row.cos_debiased - float(true_cos[i, j]))
        worst = max(worst, err)
        assert err <= tol, (row.a, row.b, row.cos_debiased, float(true_cos[i, j]))
        assert row.debiased_ci_low - 0.02 <= float(true_cos[i, j]) <= row.debiased_ci_high + 0.02
        assert row.overlaps  # every planted pair shares the common component
        if float(true_cos[i, j]) >= 0.45:  # strongly overlapping pairs also clear the chance null
            assert row.above_null
    return worst


def test_synthetic_planted_cosines_and_noise_floor():
    d, n_k, n_h, sigma, norm = 128, 150, 300, 1.0, 4.0
    vecs, true_cos = planted_vectors(d, norm)
    gen = torch.Generator().manual_seed(1)
    xs, nodes, harmful = [], [], []
    for k, v in enumerate(vecs):
        xs.append(v + sigma * torch.randn(n_k, d, generator=gen))
        nodes += [f"n{k}"] * n_k
        harmful += [True] * n_k
    xs.append(sigma * torch.randn(n_h, d, generator=gen))
    nodes += [""] * n_h
    harmful += [False] * n_h
    acts = Activations(torch.cat(xs)[:, None, None, :], [0], [-1])
    ds = extract_directions(acts, nodes, harmful, n_splits=50, n_boot=200, n_perm=100, profiles=False)
    print(f"synthetic: worst planted-cosine error {check_recovery(ds, true_cos):.4f}")
    # the raw diff-of-means directions sit at the angle to the planted ones that the noise predicts
    noise = d * sigma**2 * (1 / n_k + 1 / n_h)
    for k in range(len(SHARES)):
        got = float(torch.nn.functional.cosine_similarity(ds.get(f"n{k}", 0, -1), vecs[k], dim=0))
        assert abs(got - math.sqrt(norm**2 / (norm**2 + noise))) < 0.02
    # split-half floors match the planted noise
    expected = expected_split_half(norm**2, d * sigma**2 / n_k, d * sigma**2 / n_h)
    got = ds.noise["diff_means/split_half_mean"][: len(SHARES), 0, 0]
    assert torch.allclose(got, torch.full_like(got, expected), atol=0.03), (got, expected)
    # geometry: one dominant shared component, effective rank well below the number of nodes
    spec = spectrum(vecs)
    assert spec["first_component"] > 0.5 and spec["participation_ratio"] < len(SHARES)


def _plant_hook(vectors: dict[str, torch.Tensor], sigma: float, d: int, state: dict):
    """Adds the current group's vector and per-prompt noise (seeded by the prompt's tokens) to every position."""

    def stash_ids(module, args, kwargs):
        state["ids"] = kwargs.get("input_ids", args[0] if args else None)

    def hook(module, args, output):
        hidden = hidden_from_output(output)
        add = vectors.get(state["group"], torch.zeros(d)).expand(hidden.shape[0], d).clone()
        for row, ids in enumerate(state["ids"].tolist()):
            tokens = [t for t in ids if t != state["pad"]]
            key = zlib.crc32(repr((state["group"], tokens)).encode())  # not hash(): salted per process
            add[row] += sigma * torch.randn(d, generator=torch.Generator().manual_seed(key))
        return hidden + add.unsqueeze(1)

    return stash_ids, hook


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_planted_directions_in_a_tiny_model_residual_stream(arch):
    lm = tiny_model(arch, d_model=64)
    d, n_per = 64, 60
    # scale the planted vectors to the stream's own size at layer 2
    words = ["sea", "bread", "sky", "poem", "capital", "France", "novel", "plot", "recipe", "salt",
             "water", "yeast", "flour", "wifi", "network", "parents", "research", "chemist", "gun", "home"]
    gen = torch.Generator().manual_seed(0)

    def prompts() -> list[str]:
        idx = torch.randint(0, len(words), (n_per, 3), generator=gen).tolist()
        return [f"Tell me about the {words[a]} and the {words[b]} near {words[c]} ({i})."
                for i, (a, b, c) in enumerate(idx)]

    probe = capture_activations(lm, prompts(), [2], [-1], progress=False).acts[:, 0, 0]
    natural = float(probe.var(0).sum())  # tr Σ of the stream at layer 2, position -1
    sigma = math.sqrt(natural / d)  # planted per-prompt noise as large as the stream's own spread
    norm = 2.5 * math.sqrt(2 * natural)
    vecs, true_cos = planted_vectors(d, norm, seed=3)
    groups = {"": prompts(), **{f"n{k}": prompts() for k in range(len(SHARES))}}
    state = {"pad": lm.tokenizer.pad_token_id}
    stash, hook = _plant_hook({f"n{k}": v for k, v in enumerate(vecs)}, sigma, d, state)
    handles = [lm.model.register_forward_pre_hook(stash, with_kwargs=True),
               decoder_blocks(lm.model)[2].register_forward_hook(hook)]
    parts, nodes, harmful = [], [], []
    try:
        for name, texts in groups.items():
            state["group"] = name
            parts.append(capture_activations(lm, texts, [2], [-1, "last_instruction"], batch_size=16,
                                             progress=False).acts)
            nodes += [name] * len(texts)
            harmful += [bool(name)] * len(texts)
    finally:
        for h in handles:
            h.remove()
    acts = Activations(torch.cat(parts), [2], [-1, "last_instruction"])
    ds = extract_directions(acts, nodes, harmful, n_splits=50, n_boot=200, n_perm=100, profiles=False)
    worst = check_recovery(ds, true_cos)
    print(f"{arch}: worst planted-cosine error {worst:.4f}")
    # the noise floor is what the measured within-group noise predicts
    g = Groups.from_labels(nodes, harmful)
    x = acts.acts[:, 0, 0]
    tr_h = float(x[g.harmless].var(0).sum()) / len(g.harmless)
    for k in range(len(SHARES)):
        idx = g.nodes[f"n{k}"]
        tr_k = float(x[idx].var(0).sum()) / len(idx)
        expected = expected_split_half(norm**2, tr_k, tr_h)
        got = float(ds.noise["diff_means/split_half_mean"][k, 0, 0])
        assert abs(got - expected) < 0.06, (k, got, expected)
