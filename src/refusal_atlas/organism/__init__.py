"""Known-answer model organisms: a base chat model fine-tuned to follow the taxonomy's policy."""
