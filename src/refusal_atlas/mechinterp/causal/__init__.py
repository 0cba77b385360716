"""The causal protocol: selection, ablation, addition, cross-ablation, steering, wording vs detection, conditions."""
