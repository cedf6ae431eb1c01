"""Editors, one package per method (config, layer, editor), behind one protocol (`protocol.py`) and
looked up by name in `registry.py`: MELO (ours), ELDER, and the GRACE and sequential-LoRA baselines.

Nothing is imported here, so a method's config module can be imported without the others."""
