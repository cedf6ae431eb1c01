"""GRACE baseline: a key/value codebook at one layer. config, layer, editor."""
