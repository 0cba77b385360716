"""Mechanistic interpretability: model loading, activation capture, per-node directions, geometry, interventions."""
