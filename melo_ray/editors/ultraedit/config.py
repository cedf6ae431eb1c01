"""UltraEdit's config section (`ultraedit`). The defaults are the reference's zsRE settings (XiaojieGu/UltraEdit:
config/editor/ultraedit.yaml, config/dataset/zsre.yaml, run.sh for Mistral-7B)."""
from __future__ import annotations

from pydantic import Field

from melo_ray.config_base import StrictConfig


class UltraEditConfig(StrictConfig):
    layers: list[int] | None = Field(
        None, description="Decoder blocks whose mlp.down_proj is edited. None: the reference scripts' choice for "
        "Mistral-7B (blocks 29-30 of 32, the two below the last), at the same place (SmolLM2-135M: 27-28 of 30).",
    )
    lr: float = Field(1e-6, gt=0, description="Step size: each key's value shift is -lr * ||k_hat||^2 * g_hat "
                      "(the reference's editor.lr, 1e-6 for Mistral-7B in bfloat16).")
    ridge: float = Field(1.0, gt=0, description="Added to K^T K before the solve (the reference uses the identity).")
    eps: float = Field(1.1920929e-07, gt=0, description="Added to the running standard deviation when normalising "
                       "(the reference: float32's machine epsilon). The output gradients' spread is ~1e-4 on "
                       "SmolLM2, so a larger value damps their normalised size.")
    clip: float | None = Field(None, gt=0, description="Ours, not the reference's: clamp every normalised key and "
                               "gradient entry to [-clip, clip] before the value shift is formed. None (the "
                               "reference): no clamp. A batch whose gradients are far larger than the running "
                               "spread (as on an already heavily edited model) otherwise gets value shifts many "
                               "times the usual size, and its weight change can wreck the model.")
    forward_batch: int = Field(10, ge=1, description="Edits per forward and backward pass (the reference's "
                               "dataset.batch_size): the loss is the mean cross-entropy over that chunk's target "
                               "tokens; every chunk's keys and gradients then go into one solve.")
    iters: int = Field(1, ge=1, description="Closed-form steps per batch. The reference takes one (1); more is our "
                       "extension: each step takes the edits' keys and gradients on the weights the previous "
                       "step left and keeps its own lifelong normaliser.")
