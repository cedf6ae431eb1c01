"""WISE (Wang et al., NeurIPS 2024): a side memory of one FFN value matrix with an activation router. config, layer, editor."""
