"""The relation view: MiniLM with a small LoRA adapter, tuned so that two wordings of one question sit
close and two questions about one subject sit apart.

The stock MiniLM key is dominated by the subject (docs/results.md, "Scope test"); this view embeds the
prompt's focus (its last sentence) with an encoder taught, on the public training splits only, that
"The mother of X is who?" and "Who is the mother of X?" are one question and "Who is the father of X?"
another, and "Who is the mother of Y?" another still. `scope_training` trains the adapter; it travels inside the verifier's file (tensors named
`relation.*`, settings in the metadata), so a snapshot keys its queries with the adapter it was
written with. The adapter is merged into a copy of the encoder's weights, so a query pays one plain
MiniLM pass for the view.
"""
from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch

from melo_ray.editors.melo.scope.encoder import SentenceEncoderKeys
from melo_ray.editors.melo.scope.views import RELATION_META_KEY as META_KEY
from melo_ray.editors.melo.scope.views import RELATION_TENSOR_PREFIX as TENSOR_PREFIX
from melo_ray.editors.melo.scope.verifier import ScopeVerifier
from melo_ray.editors.melo.scope.views import relation_text


@dataclass(frozen=True)
class AdapterSettings:
    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ("query", "key", "value", "dense")

    def to_meta(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_meta(cls, text: str) -> "AdapterSettings":
        try:
            raw = json.loads(text)
            return cls(int(raw["rank"]), int(raw["alpha"]), tuple(str(t) for t in raw["targets"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"scope verifier: {META_KEY} settings are malformed ({exc})") from exc

    def lora_config(self):  # peft.LoraConfig, imported only where the view is used
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.targets), lora_dropout=0.0)


def with_adapter(model: torch.nn.Module, settings: AdapterSettings):
    """A peft model wrapping `model` with a fresh (zero-effect) adapter of these settings."""
    from peft import get_peft_model

    return get_peft_model(model, settings.lora_config())


def adapter_tensors(peft_model) -> dict[str, np.ndarray]:
    """The adapter's weights as named arrays (peft's own state-dict names, prefixed for the file)."""
    from peft import get_peft_model_state_dict

    return {TENSOR_PREFIX + name: t.detach().cpu().numpy().astype(np.float32)
            for name, t in get_peft_model_state_dict(peft_model).items()}


def adapter_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """A short fingerprint of an adapter's tensors: which adapter keys were made with."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode() + np.ascontiguousarray(tensor, np.float32).tobytes())
    return digest.hexdigest()[:16]


class RelationEncoder:
    """The tuned view: the adapter merged into a private copy of MiniLM."""

    def __init__(self, tensors: Mapping[str, np.ndarray], settings: AdapterSettings, base: SentenceEncoderKeys) -> None:
        from peft import set_peft_model_state_dict

        self.base = base
        self.dim = base.dim
        self.digest = adapter_digest(tensors)
        peft_model = with_adapter(copy.deepcopy(base.model), settings)
        state = {name[len(TENSOR_PREFIX):]: torch.from_numpy(np.array(t, np.float32)) for name, t in tensors.items()}
        result = set_peft_model_state_dict(peft_model, state)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected or not state:
            raise ValueError(f"scope verifier: the relation adapter does not fit MiniLM ({unexpected[:3] or 'empty'})")
        self.model = peft_model.merge_and_unload().eval()

    @classmethod
    def of(cls, verifier: ScopeVerifier, base: SentenceEncoderKeys) -> "RelationEncoder":
        return cls(verifier.relation_tensors, AdapterSettings.from_meta(verifier.meta[META_KEY]), base)

    def keys(self, prompts: list[str]) -> np.ndarray:
        return self.base.encode([relation_text(p) for p in prompts], self.model)


def train_adapter(examples: list[tuple[str, list[str], list[str], list[str]]], settings: AdapterSettings, *,
                  epochs: int, seed: int, batch_size: int = 32, lr: float = 5e-4, scale: float = 20.0,
                  base: SentenceEncoderKeys | None = None, progress=None) -> dict[str, np.ndarray]:
    """Tune an adapter on (prompt, its other wordings, other questions about its subject, its question
    about other subjects) examples; the last list may be empty.

    The loss is the usual in-batch contrastive one (as sentence-transformers' multiple-negatives
    ranking loss with hard negatives): each prompt must pick its own wording out of every wording and
    every hard negative in the batch, one of each kind drawn per prompt."""
    base = base or SentenceEncoderKeys()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = with_adapter(copy.deepcopy(base.model).train(), settings)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    usable = [e for e in examples if e[1] and e[2]]

    def pick(texts: list[str]) -> str:
        return texts[rng.integers(len(texts))]

    steps = 0
    for _ in range(epochs):
        order = rng.permutation(len(usable))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            batch = [usable[i] for i in order[start : start + batch_size]]
            anchors = base.embed([relation_text(prompt) for prompt, *_ in batch], model)
            others = base.embed([relation_text(t) for t in [pick(same) for _, same, _, _ in batch]
                                 + [pick(subject) for _, _, subject, _ in batch]
                                 + [pick(other or subject) for _, _, subject, other in batch]], model)
            loss = torch.nn.functional.cross_entropy(anchors @ others.T * scale, torch.arange(len(batch)))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            steps += 1
            if progress is not None and steps % 50 == 0:
                progress(steps, loss.item())
    return adapter_tensors(model)
