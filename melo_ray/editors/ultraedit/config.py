"""UltraEdit's config section (`ultraedit`)."""
from __future__ import annotations

from pydantic import Field

from melo_ray.config_base import StrictConfig


class UltraEditConfig(StrictConfig):
    layers: list[int] | None = Field(
        None, description="Decoder blocks whose mlp.down_proj is edited. None: the reference scripts' choice for "
        "Mistral-7B (blocks 29-30 of 32, the two below the last), at the same place (SmolLM2-135M: 27-28 of 30).",
    )
    lr: float = Field(1e-3, gt=0, description="Step size: each key's value shift is -lr * ||k_hat||^2 * g_hat.")
    ridge: float = Field(1.0, gt=0, description="Added to K^T K before the solve (the reference uses the identity).")
    eps: float = Field(1e-5, gt=0, description="Added to the running standard deviation when normalising.")
    iters: int = Field(1, ge=1, description="Closed-form steps per batch (the reference's editor.iters): each takes "
                       "the edits' keys and gradients on the weights the previous step left and keeps its own "
                       "lifelong normaliser.")
