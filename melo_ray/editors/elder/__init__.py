"""ELDER: mixture of LoRA experts with a learned router. config, layer (experts + router), editor."""
