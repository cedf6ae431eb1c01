"""UltraEdit (2025): training-free closed-form edits with lifelong normalisation. config, editor."""
