"""Running a causal LM: loading, decoder blocks, generation, token positions, prefix reuse, capture."""
