"""MEMOIR (Wang et al., NeurIPS 2025): a sparse residual memory in one FFN layer. config, layer, editor."""
