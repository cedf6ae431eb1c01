"""AlphaEdit (Fang et al., ICLR 2025): locate-then-edit with a null-space projection. config, layer, editor."""
