"""Sparse autoencoders in SAELens's format: load/save, train (TopK), select per-node features, clamp, compare."""

from refusal_atlas.mechinterp.sae.format import load_release, load_sae, save_sae
from refusal_atlas.mechinterp.sae.model import SAEConfig, SparseAutoencoder

__all__ = ["SAEConfig", "SparseAutoencoder", "load_release", "load_sae", "save_sae"]
