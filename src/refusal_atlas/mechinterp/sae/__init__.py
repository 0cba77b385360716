"""Sparse autoencoders in SAELens's format: load/save, train (TopK), select per-node features, clamp, compare."""

from refusal_atlas.mechinterp.sae.clamp import clamp
from refusal_atlas.mechinterp.sae.data import open_activations
from refusal_atlas.mechinterp.sae.format import load_release, load_sae, save_sae
from refusal_atlas.mechinterp.sae.model import SAEConfig, SparseAutoencoder
from refusal_atlas.mechinterp.sae.train import TrainSettings, train_sae

__all__ = ["SAEConfig", "SparseAutoencoder", "TrainSettings", "clamp", "load_release", "load_sae",
           "open_activations", "save_sae", "train_sae"]
