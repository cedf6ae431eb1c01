"""melo-ray: lifelong model editing with neuron-indexed dynamic LoRA."""
__version__ = "0.1.0"
