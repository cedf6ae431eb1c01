"""Key functions: turn prompts into the vectors the neuron index searches.

A key is computed once per prompt, before any LoRA layer runs, and is held fixed while generating.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np
import torch
from torch import nn

from melo_ray.backbones import Backbone
from melo_ray.editors.melo.config import IndexConfig
from melo_ray.editors.melo.scope.encoder import SentenceEncoderKeys, pool
from melo_ray.editors.melo.scope.relation import RelationEncoder, adapter_digest
from melo_ray.editors.melo.scope.views import HASHED_VIEWS, TEXT_VIEWS, VIEWS, WORDS_DIM
from melo_ray.editors.melo.scope.verifier import ScopeVerifier, load_verifier
from melo_ray.records import EditRecord
from melo_ray.text import focus


class KeyFunction(Protocol):
    dim: int

    def keys(self, prompts: list[str]) -> np.ndarray:
        """(len(prompts), dim) float32 keys."""
        ...


class _StopForward(Exception):
    """Raised from the key hook: nothing above the key module is needed."""


class HiddenStateKeys:
    """Hidden state of `key_module` at the prompt's last real token (the paper) or its mean."""

    def __init__(
        self, backbone: Backbone, key_module: str, pooling: str, batch_size: int = 64, *, capture: str = "output"
    ) -> None:
        self.backbone = backbone
        self.pooling = pooling
        self.capture = capture  # "output" of the module (MELO) or its "input" (GRACE's layer input)
        self.batch_size = batch_size
        try:
            self.module: nn.Module = backbone.model.get_submodule(key_module)
        except AttributeError as exc:
            raise KeyError(f"index.key_module: no module named '{key_module}'") from exc
        probe = self.keys(["probe"])
        self.dim = probe.shape[1]

    def _forward(self, batch: dict[str, torch.Tensor]) -> None:
        model = self.backbone.model
        if self.backbone.task == "seq2seq":
            model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        else:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)

    @torch.no_grad()
    def keys(self, prompts: list[str]) -> np.ndarray:
        out: list[np.ndarray] = []
        for start in range(0, len(prompts), self.batch_size):
            # the key reads the question as the template shows it, whichever view the model is asked in
            chunk = [self.backbone.template_prompt(p) for p in prompts[start : start + self.batch_size]]
            batch = {k: v.to(self.backbone.device) for k, v in self.backbone.tokenize(chunk, return_tensors="pt", padding=True).items()}
            captured: list[torch.Tensor] = []

            def hook(_module: nn.Module, inputs: tuple, output: object) -> None:
                seen = inputs[0] if self.capture == "input" else output
                hidden = seen[0] if isinstance(seen, tuple) else seen
                captured.append(pool(hidden.float(), batch["attention_mask"], self.pooling))
                raise _StopForward

            handle = self.module.register_forward_hook(hook)
            try:
                self._forward(batch)
            except _StopForward:
                pass
            finally:
                handle.remove()
            if not captured:
                raise RuntimeError("the key module did not run during the forward pass")
            out.append(captured[0].cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


class ScopedSentenceKeys:
    """MiniLM keys of several views of each prompt, concatenated: the first (the whole prompt) is what
    the index routes on, all of them feed the scope test (scope.py names the views)."""

    def __init__(self, views: list[str], encoder: SentenceEncoderKeys | None = None,
                 relation: RelationEncoder | None = None) -> None:
        unknown = [v for v in views if v not in VIEWS]
        if unknown or not views or views[0] != "prompt":
            raise ValueError(f"scope views must start with 'prompt' and be among {list(VIEWS)}, got {views}")
        if ("relation" in views) != (relation is not None):
            raise ValueError("scope views: the relation view needs its tuned encoder, and only it")
        self.encoder = encoder or SentenceEncoderKeys()
        self.relation = relation
        self.views = list(views)
        self.view_dims = [WORDS_DIM if v in HASHED_VIEWS else self.encoder.dim for v in views]
        self.dim = sum(self.view_dims)

    def keys(self, prompts: list[str]) -> np.ndarray:
        return self.complete(prompts, self.routing_keys(prompts))

    def reads(self, verifier: ScopeVerifier) -> bool:
        """Whether these keys are the ones `verifier` reads: its views, and its relation adapter."""
        if self.views != verifier.view_names:
            return False
        if self.relation is None:
            return not verifier.relation_tensors
        return self.relation.digest == adapter_digest(verifier.relation_tensors)

    def routing_keys(self, prompts: list[str]) -> np.ndarray:
        """The first view alone (the whole prompt): what the index searches clusters with."""
        return self.encoder.keys(list(prompts))

    def focus_keys(self, prompts: list[str], routing: np.ndarray) -> np.ndarray:
        """The focus view of each prompt, given its routing view: a prompt that is its own focus (one
        sentence, the usual query) reuses its routing key instead of a second encoder pass."""
        texts = [focus(p) for p in prompts]
        out = np.array(routing, np.float32, copy=True)
        apart = [i for i, (text, prompt) in enumerate(zip(texts, prompts)) if text != prompt]
        if apart:
            out[apart] = self.encoder.keys([texts[i] for i in apart])
        return out

    def complete(self, prompts: list[str], routing: np.ndarray,
                 known: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Whole keys from the first view already computed (and any other view in `known`): the other
        views, concatenated after it. The focus view comes from `focus_keys`, so a prompt that is its own
        focus is encoded once, in training as in routing."""
        if not prompts:
            return np.zeros((0, self.dim), np.float32)
        known = dict(known or {})
        if "focus" in self.views and "focus" not in known:
            known["focus"] = self.focus_keys(prompts, routing)
        parts = [routing] + [
            known[view] if view in known
            else np.stack([HASHED_VIEWS[view](p) for p in prompts]) if view in HASHED_VIEWS
            else self.relation.keys(list(prompts)) if view == "relation"
            else self.encoder.keys([TEXT_VIEWS[view](p) for p in prompts])
            for view in self.views[1:]
        ]
        return np.concatenate(parts, axis=1).astype(np.float32)


def prompt_and_paraphrase_keys(
    key_function: KeyFunction, records: list[EditRecord], with_paraphrases: bool,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Keys of the records' prompts and, with `with_paraphrases`, of their `train_rephrases`, in one
    encoder pass: (prompt keys, paraphrase keys, the position in `records` each paraphrase belongs to)."""
    owners = [i for i, r in enumerate(records) for _ in r.train_rephrases] if with_paraphrases else []
    paraphrases = [p for r in records for p in r.train_rephrases] if with_paraphrases else []
    keys = key_function.keys([r.prompt for r in records] + paraphrases)
    if not np.all(np.isfinite(keys)):
        raise ValueError("edit batch: a prompt or training paraphrase produced a non-finite key")
    return keys[: len(records)], keys[len(records) :], owners


def scoped_keys_for(verifier: ScopeVerifier, encoder: SentenceEncoderKeys | None = None) -> ScopedSentenceKeys:
    """The keys a verifier reads: its views, the relation view with the adapter its file carries."""
    encoder = encoder or SentenceEncoderKeys()
    relation = None
    if "relation" in verifier.view_names:
        relation = RelationEncoder.of(verifier, encoder)
    return ScopedSentenceKeys(verifier.view_names, encoder, relation)


def build_key_function(backbone: Backbone, cfg: IndexConfig) -> KeyFunction:
    if cfg.key_function == "sentence_encoder":
        if cfg.scope_verifier is not None:
            encoder = SentenceEncoderKeys(device=backbone.device)  # beside the backbone: on its GPU when it has one
            return scoped_keys_for(load_verifier(cfg.scope_verifier), encoder)
        return SentenceEncoderKeys(device=backbone.device)
    pooling = "last" if cfg.key_function == "last_token" else "mean"
    return HiddenStateKeys(backbone, cfg.key_module or "", pooling)
