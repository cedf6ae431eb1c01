"""The scope test: does a prompt ask the *same question* as an indexed edit, or only something about
the same subject?

A MiniLM sentence key is dominated by the subject: "The taxon rank of X is" sits closer to "Which
family does X belong to?" than many rewordings of the latter do (docs/results.md, "Scope test"). So
the index asks two things of a query before it switches a block on:

1. the routing view (the MiniLM key of the prompt) lies inside the cluster's radius: the subject and
   the topic match, which keeps unrelated questions and other subjects on the base model;
2. a small learned verifier, given both prompts' key views, says they ask the same question.

The verifier is a one-hidden-layer MLP over symmetric pair features of each view (a*b, |a-b|, cosine).
Its views are MiniLM keys of the prompt, of its *focus* (the last sentence, so long unrelated prefixes
do not move it) and of the focus with names masked out (what is asked, not about whom), and two
token-level views: the hashed bag of the masked focus's content words (what is asked) and of the
character trigrams of the names it took out (about whom). A last view, the *relation* view, embeds the
focus (the whole prompt when the focus names no one) with MiniLM tuned (a LoRA adapter, relation.py) to
put wordings of one question together and other questions, about the subject or with another subject,
apart; its cosine, times a weight set on held-out pairs, is added to the MLP's logit. A names gate in its settings refuses, whatever
the MLP says, two prompts that both name someone and whose names share almost no trigrams: the same
template about another subject. It is trained only on the public training splits by
`melo_ray.editors.melo.scope.training.verifier_training`, shipped as `scope_verifier.safetensors` (weights, and its
settings in the safetensors metadata: no pickle), and copied into every index snapshot so a snapshot
always routes the way it did when it was written.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import safetensors.numpy

from melo_ray.snapshots import safetensors_metadata
from melo_ray.editors.melo.scope.views import (
    RELATION_META_KEY,
    RELATION_TENSOR_PREFIX,
    WORDS_DIM,
    names_someone,
    pair_features,
    row_cosine,
)

BUILTIN_VERIFIER = Path(__file__).with_name("scope_verifier.safetensors")


class ScopeVerifier:
    """Pair classifier: logit that two keys (concatenated views, widths `view_dims`) ask the same question."""

    def __init__(self, weights: Mapping[str, np.ndarray], meta: Mapping[str, str]) -> None:
        self.view_names = [v for v in str(meta["views"]).split(",") if v]
        self.view_dims = [int(d) for d in str(meta["view_dims"]).split(",") if d]
        if len(self.view_names) != len(self.view_dims) or not self.view_names:
            raise ValueError("scope verifier: views and view_dims disagree")
        self.meta = dict(meta)
        self._raw: bytes | None = None
        # the relation view's adapter travels with the verifier, so keys follow the file they were made for
        self.relation_tensors = {k: np.asarray(v, np.float32) for k, v in weights.items()
                                 if k.startswith(RELATION_TENSOR_PREFIX)}
        if ("relation" in self.view_names) != bool(self.relation_tensors) or (
                self.relation_tensors and RELATION_META_KEY not in self.meta):
            raise ValueError("scope verifier: the relation view needs its adapter (tensors and settings), and only it")
        # the MLP reads every view but the tuned one, which adds its cosine times `relation_weight` to the
        # logit: one weight, set on held-out pairs, so the MLP never learns from an adapter that saw its pairs
        if "relation" in self.view_names and self.view_names[-1] != "relation":
            raise ValueError("scope verifier: the relation view must come last")
        self.mlp_dims = self.view_dims[:-1] if self.relation_tensors else list(self.view_dims)
        self.relation_weight = float(meta.get("relation_weight", 0.0)) if self.relation_tensors else 0.0
        self.w1 = np.asarray(weights["w1"], np.float32)  # (features, hidden)
        self.b1 = np.asarray(weights["b1"], np.float32)
        self.w2 = np.asarray(weights["w2"], np.float32)  # (hidden,)
        self.b2 = float(np.asarray(weights["b2"], np.float32).reshape(-1)[0])
        features = sum(2 * d + 1 for d in self.mlp_dims)
        if self.w1.shape[0] != features or self.w1.shape[1] != self.b1.shape[0] or self.w2.shape != self.b1.shape:
            raise ValueError(f"scope verifier: weights do not fit views of {self.view_dims} dims")
        # names gate: two prompts that both name someone, with names this far apart (trigram cosine
        # below the gate), never ask the same question, whatever the MLP says
        self.names_gate = float(meta["names_gate"]) if meta.get("names_gate") not in (None, "") else None
        if self.names_gate is not None and "names" not in self.view_names:
            raise ValueError("scope verifier: names_gate needs the 'names' view")

    @property
    def key_dim(self) -> int:
        return sum(self.view_dims)

    def with_names_gate(self, gate: float | None) -> "ScopeVerifier":
        """The same weights with another names gate (None: none)."""
        meta = {k: v for k, v in self.meta.items() if k != "names_gate"}
        if gate is not None:
            meta["names_gate"] = str(gate)
        return ScopeVerifier(self._weights(), meta)

    def with_relation_weight(self, weight: float) -> "ScopeVerifier":
        """The same weights with another weight on the relation view's cosine."""
        return ScopeVerifier(self._weights(), {**self.meta, "relation_weight": str(weight)})

    def with_relation_view(self, tensors: Mapping[str, np.ndarray], settings: str, dim: int,
                           weight: float = 0.0, **meta: str) -> "ScopeVerifier":
        """This verifier (without a relation view) plus one: its adapter's tensors, settings (JSON) and
        width, and the weight on its cosine."""
        if self.relation_tensors:
            raise ValueError("scope verifier: it has a relation view already")
        return ScopeVerifier({**self._weights(), **tensors}, {
            **self.meta, **meta, "views": self.meta["views"] + ",relation", "view_dims": self.meta["view_dims"] + f",{dim}",
            RELATION_META_KEY: settings, "relation_weight": str(weight)})

    def with_calibration(self, threshold: float, how: str) -> "ScopeVerifier":
        """The same weights with the threshold calibrated for them, and how it was placed, in the file."""
        return ScopeVerifier(self._weights(), {**self.meta, "threshold": repr(float(threshold)), "calibrated_on": how})

    @property
    def calibrated_threshold(self) -> float | None:
        """The threshold stored in the file with its weights; None for files written before calibration."""
        value = self.meta.get("threshold")
        return float(value) if value not in (None, "") else None

    def logits(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(n,) logits for rows a[i], b[i] (a broadcasts when it has one row)."""
        a, b = np.atleast_2d(a), np.atleast_2d(b)
        if a.shape[0] == 1 and b.shape[0] > 1:
            a = np.repeat(a, b.shape[0], axis=0)
        width = sum(self.mlp_dims)
        hidden = np.maximum(pair_features(a[:, :width], b[:, :width], self.mlp_dims) @ self.w1 + self.b1, 0.0)
        out = hidden @ self.w2 + self.b2
        if self.relation_tensors:
            out = out + self.relation_weight * row_cosine(a[:, width:], b[:, width:])
        if self.names_gate is not None:
            out = np.where(self._names_apart(a, b), -np.inf, out)
        return out

    def _names_views(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        start = sum(self.view_dims[: self.view_names.index("names")])
        return tuple(np.atleast_2d(x)[:, start : start + WORDS_DIM].astype(np.float32) for x in (a, b))

    def names_cosine(self, a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
        """(n,) trigram cosine of the names views of rows a[i], b[i] (a broadcasts when it has one
        row); None when the verifier has no names view."""
        if "names" not in self.view_names:
            return None
        return row_cosine(*self._names_views(a, b))

    def _names_apart(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Rows whose prompts both name someone and whose names' trigram cosine is below the gate."""
        na, nb = self._names_views(a, b)
        return (row_cosine(na, nb) < self.names_gate) & names_someone(na) & names_someone(nb)

    # -- files ---------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The file's bytes: those it was read from (safetensors orders metadata differently per
        write, and a snapshot must round-trip byte for byte), else written once and kept."""
        if self._raw is None:
            self._raw = self._serialise()
        return self._raw

    def _weights(self) -> dict[str, np.ndarray]:
        return {"w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": np.array([self.b2], np.float32),
                **self.relation_tensors}

    def _serialise(self) -> bytes:
        return safetensors.numpy.save(self._weights(), metadata={k: str(self.meta[k]) for k in sorted(self.meta)})

    @classmethod
    def from_bytes(cls, data: bytes) -> "ScopeVerifier":
        meta = _metadata(data)
        try:
            weights = safetensors.numpy.load(data)
        except Exception as exc:  # safetensors raises its own error type
            raise ValueError(f"scope verifier: unreadable weights ({exc})") from exc
        verifier = cls(weights, meta)
        verifier._raw = bytes(data)
        return verifier

    @classmethod
    def load(cls, path: str | Path) -> "ScopeVerifier":
        return cls.from_bytes(Path(path).read_bytes())


def _metadata(data: bytes) -> dict[str, str]:
    meta = safetensors_metadata(data, "scope verifier")
    if "views" not in meta or "view_dims" not in meta:
        raise ValueError("scope verifier: metadata lacks views / view_dims")
    return meta


def load_verifier(source: str) -> ScopeVerifier:
    """`builtin` (the verifier shipped beside this module) or a path to a verifier file."""
    path = BUILTIN_VERIFIER if source == "builtin" else Path(source)
    try:
        return ScopeVerifier.load(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"index.scope_verifier: no verifier file at {path}") from exc
