"""A scope model that reads both prompts at once: MiniLM fine-tuned on (edited prompt, query) pairs, the
mean of its states over the pair through one linear head giving the logit that the two ask the same
question.

Two separately embedded prompts can only be compared feature by feature; a cross-encoder attends from
"follows" to "is followed by" and from "place of death" to "gender" directly. Its file is safetensors:
the encoder's and head's weights, and in the metadata the BERT config, the tokenizer's settings come
from the MiniLM package it was tuned from, the decision threshold (calibrated on held-out relations)
and the format version. No pickle.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from torch import nn

from melo_ray.editors.melo.scope.encoder import encoder_folder
from melo_ray.snapshots import safetensors_metadata

FORMAT = "melo-scope-cross-encoder"
VERSION = "1"  # mean-pooled head
MAX_LENGTH = 48  # both prompts together; the edit prompts and queries here are one or two sentences


class CrossEncoder(nn.Module):
    """BERT body + a linear head on the mean-pooled states of the pair: (batch,) logits."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(int(body.config.hidden_size), 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state  # (B, T, H)
        # the mean over the pair's tokens, not [CLS]: MiniLM was tuned with mean pooling and its [CLS]
        # state is one vector for every input (cosine 0.999998 across unrelated pairs), which left the
        # loss at ln 2 for 100 steps at two learning rates
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, H)
        return self.head(pooled).squeeze(-1)  # (B,)


def tokenizer_folder() -> Path:
    return encoder_folder()


class CrossScopeModel:
    """A cross-encoder with its threshold, as read from (and written to) one safetensors file."""

    def __init__(self, model: CrossEncoder, tokenizer, threshold: float, meta: Mapping[str, str] | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.threshold = float(threshold)
        self.meta = dict(meta or {})

    @classmethod
    def from_pretrained_body(cls, layers: int | None = None, folder: Path | None = None) -> "CrossScopeModel":
        """A fresh head on the MiniLM package's weights (offline; its first `layers` layers, all when
        None: a shallower body halves a pair's cost), threshold 0: the start of training."""
        from transformers import AutoModel, AutoTokenizer

        folder = folder or tokenizer_folder()
        body = AutoModel.from_pretrained(folder, dtype=torch.float32, add_pooling_layer=False)
        if layers is not None and layers < body.config.num_hidden_layers:
            body.encoder.layer = body.encoder.layer[:layers]
            body.config.num_hidden_layers = layers
        return cls(CrossEncoder(body), AutoTokenizer.from_pretrained(folder), 0.0)

    def encode(self, firsts: list[str], seconds: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(firsts, seconds, return_tensors="pt", padding=True, truncation=True, max_length=MAX_LENGTH)

    @torch.no_grad()
    def logits(self, firsts: list[str], seconds: list[str], batch_size: int = 128) -> np.ndarray:
        """(n,) logits that seconds[i] asks what firsts[i] (the edited prompt) asks."""
        out = [self.model(**self.encode(firsts[s : s + batch_size], seconds[s : s + batch_size])).numpy()
               for s in range(0, len(firsts), batch_size)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)

    def accepts(self, firsts: list[str], seconds: list[str]) -> np.ndarray:
        return self.logits(firsts, seconds) >= self.threshold

    # -- files ---------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        meta = {**self.meta, "format": FORMAT, "version": VERSION, "threshold": repr(self.threshold),
                "bert_config": self.model.body.config.to_json_string(use_diff=False)}
        state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        return safetensors.torch.save(state, metadata=meta)

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, tokenizer=None) -> "CrossScopeModel":
        from transformers import AutoTokenizer, BertConfig, BertModel

        meta = safetensors_metadata(data, "cross scope model")
        if meta.get("format") != FORMAT:
            raise ValueError(f"cross scope model: not a {FORMAT} file")
        if meta.get("version") != VERSION:
            raise ValueError(f"cross scope model: version {meta.get('version')} is not {VERSION}")
        config = BertConfig.from_dict(json.loads(meta["bert_config"]))
        model = CrossEncoder(BertModel(config, add_pooling_layer=False))
        state = safetensors.torch.load(data)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"cross scope model: weights do not fit ({missing[:3]} missing, {unexpected[:3]} unexpected)")
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(tokenizer_folder())
        return cls(model, tokenizer, float(meta["threshold"]), meta)

    @classmethod
    def load(cls, path: str | Path, tokenizer=None) -> "CrossScopeModel":
        return cls.from_bytes(Path(path).read_bytes(), tokenizer)
