"""Sequential LoRA fine-tuning baseline (one PEFT adapter, no routing)."""
