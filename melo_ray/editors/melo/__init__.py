"""MELO: neuron-indexed dynamic LoRA. config (lora, index sections), layer (the block bank), keys, index, editor."""
