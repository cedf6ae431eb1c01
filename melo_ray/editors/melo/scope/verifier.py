"""The scope test: does a prompt ask the *same question* as an indexed edit, or only something about
the same subject?

A MiniLM sentence key is dominated by the subject: "The taxon rank of X is" sits closer to "Which
family does X belong to?" than many rewordings of the latter do (docs/results.md, "Scope test"). So
the index asks two things of a query before it switches a block on:

1. the routing view (the MiniLM key of the prompt) lies inside the cluster's radius: the subject and
   the topic match, which keeps unrelated questions and other subjects on the base model;
2. a small learned verifier, given both prompts' key views, says they ask the same question.

The verifier's head is one of three. The pair MLP (one hidden layer) reads symmetric pair features of each
view (a*b, |a-b|, cosine). The similarity ensemble (`similarity_training`) reads each view's cosine and two
names flags only, averaged over a few small MLPs: it cannot learn where a relation sits in MiniLM's space,
so what it learns carries to relations it never saw (docs/scope_validation.md, "Fifth session"). The
blend (`blend_training`) holds one of each, trained on the same split, and adds their standardised logits:
they fail on different pairs (docs/scope_validation.md, "Sixth session").
Its views are MiniLM keys of the prompt, of its *focus* (the last sentence, so long unrelated prefixes
do not move it) and of the focus with names masked out (what is asked, not about whom), and two
token-level views: the hashed bag of the masked focus's content words (what is asked) and of the
character trigrams of the names it took out (about whom). A last view, the *relation* view, embeds the
focus (the whole prompt when the focus names no one) with MiniLM tuned (a LoRA adapter, relation.py) to
put wordings of one question together and other questions, about the subject or with another subject,
apart; the pair MLP adds its cosine times a weight set on held-out pairs to its logit, the similarity
ensemble reads it as one more cosine. A names gate in its settings refuses, whatever the head says, two
prompts that both name someone and whose names share almost no trigrams: the same template about another
subject. It is trained only on the public training splits by
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
    similarity_features,
)

BUILTIN_VERIFIER = Path(__file__).with_name("scope_verifier.safetensors")
PAIR_MLP = "pair_mlp"
SIMILARITY_ENSEMBLE = "similarity_ensemble"
BLEND = "blend"
HEADS = (PAIR_MLP, SIMILARITY_ENSEMBLE, BLEND)


class Blend:
    """How a `blend` head adds its two logits: each standardised by the mean and deviation it had on the
    calibration pairs, then (1 - weight) x the pair MLP's + weight x the similarity ensemble's, mapped back
    to log-odds by the same weights of their means and deviations. So weight 0 is the pair MLP's logit and
    weight 1 the ensemble's, exactly, and in between the sum stays on the heads' log-odds scale, which
    rules that read a logit as log-odds (the namesake bar's ln k) assume. Metadata `blend_weight` and
    `blend_scale` ("pair mean,pair std,similarity mean,similarity std")."""

    def __init__(self, weight: float, scale: tuple[float, float, float, float]) -> None:
        if not 0.0 <= weight <= 1.0 or len(scale) != 4 or not all(np.isfinite(scale)) or min(scale[1], scale[3]) <= 0:
            raise ValueError(f"scope verifier: a blend needs a weight in [0, 1] and four finite scale values "
                             f"with positive deviations (got {weight}, {scale})")
        self.weight, self.scale = float(weight), tuple(float(x) for x in scale)

    @classmethod
    def from_meta(cls, meta: Mapping[str, str]) -> "Blend":
        for field in ("blend_weight", "blend_scale"):
            if field not in meta:
                raise ValueError(f"scope verifier: a blend head needs {field!r} in its metadata")
        try:
            weight = float(meta["blend_weight"])
        except ValueError as exc:
            raise ValueError(f"scope verifier: blend_weight {meta['blend_weight']!r} is not a number") from exc
        try:
            scale = tuple(float(x) for x in str(meta["blend_scale"]).split(","))
        except ValueError as exc:
            raise ValueError(f"scope verifier: blend_scale {meta['blend_scale']!r} is not four numbers") from exc
        return cls(weight, scale)

    def meta(self) -> dict[str, str]:
        return {"blend_weight": repr(self.weight), "blend_scale": ",".join(repr(x) for x in self.scale)}

    def combine(self, pair: np.ndarray, similarity: np.ndarray) -> np.ndarray:
        pair_mean, pair_std, sim_mean, sim_std = self.scale
        w = self.weight
        standard = np.zeros(np.broadcast(pair, similarity).shape)
        if w < 1.0:  # a head weighted 0 is left out, so its -inf (0 x -inf) cannot turn the sum into NaN
            standard = standard + (1.0 - w) * (pair - pair_mean) / pair_std
        if w > 0.0:
            standard = standard + w * (similarity - sim_mean) / sim_std
        return ((1.0 - w) * pair_mean + w * sim_mean) + ((1.0 - w) * pair_std + w * sim_std) * standard


class SimilarityEnsemble:
    """k MLPs with two hidden layers over `similarity_features`, their logits averaged (one member's
    tail is unstable: the bar sits at the 0.5% of negatives, a handful of pairs). Tensors `s.w1` (k, F, H),
    `s.b1` (k, H), `s.w2` (k, H, H), `s.b2` (k, H), `s.w3` (k, H), `s.b3` (k,)."""

    NAMES = ("s.w1", "s.b1", "s.w2", "s.b2", "s.w3", "s.b3")

    def __init__(self, tensors: Mapping[str, np.ndarray], n_features: int) -> None:
        if set(tensors) != set(self.NAMES):
            raise ValueError(f"scope verifier: a similarity ensemble needs exactly the tensors {list(self.NAMES)}")
        self.tensors = {k: np.asarray(tensors[k], np.float32) for k in self.NAMES}
        w1, b1, w2, b2, w3, b3 = (self.tensors[k] for k in self.NAMES)
        k, hidden = b1.shape if b1.ndim == 2 else (0, 0)
        if (w1.shape != (k, n_features, hidden) or w2.shape != (k, hidden, hidden) or b2.shape != (k, hidden)
                or w3.shape != (k, hidden) or b3.shape != (k,) or k == 0):
            raise ValueError(f"scope verifier: similarity ensemble tensors do not fit {n_features} features")

    @property
    def members(self) -> int:
        return int(self.tensors["s.b3"].shape[0])

    def logits(self, features: np.ndarray) -> np.ndarray:
        w1, b1, w2, b2, w3, b3 = (self.tensors[k] for k in self.NAMES)
        hidden = np.maximum(np.einsum("nf,kfh->knh", features, w1) + b1[:, None, :], 0.0)
        hidden = np.maximum(np.einsum("knh,khg->kng", hidden, w2) + b2[:, None, :], 0.0)
        return (np.einsum("kng,kg->kn", hidden, w3) + b3[:, None]).mean(axis=0).astype(np.float64)


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
        if "relation" in self.view_names and self.view_names[-1] != "relation":
            raise ValueError("scope verifier: the relation view must come last")
        # the head: `pair_mlp` (files written before the head was named) reads symmetric features of every
        # view's vectors, the tuned relation view apart, adding its cosine times `relation_weight`;
        # `similarity_ensemble` reads each view's cosine only (relation view included) and averages k MLPs;
        # `blend` holds both and adds their logits, each standardised on calibration pairs, in fixed weights
        self.head = self.meta.get("head", PAIR_MLP)
        if self.head not in HEADS:
            raise ValueError(f"scope verifier: unknown head {self.head!r} (this build reads {', '.join(HEADS)})")
        self.relation_weight = 0.0
        if self.head in (PAIR_MLP, BLEND):
            self._read_pair_mlp(weights)
        elif "relation_weight" in self.meta:
            raise ValueError("scope verifier: a similarity ensemble reads the relation view as a feature; "
                             "relation_weight does not apply")
        if self.head in (SIMILARITY_ENSEMBLE, BLEND):
            n_features = len(self.view_dims) + (2 if "names" in self.view_names else 0)
            self.ensemble = SimilarityEnsemble({k: v for k, v in weights.items() if k.startswith("s.")}, n_features)
        if self.head == BLEND:
            self.blend = Blend.from_meta(self.meta)
        # names gate: two prompts that both name someone, with names this far apart (trigram cosine
        # below the gate), never ask the same question, whatever the MLP says
        self.names_gate = float(meta["names_gate"]) if meta.get("names_gate") not in (None, "") else None
        if self.names_gate is not None and "names" not in self.view_names:
            raise ValueError("scope verifier: names_gate needs the 'names' view")

    def _read_pair_mlp(self, weights: Mapping[str, np.ndarray]) -> None:
        missing = [name for name in ("w1", "b1", "w2", "b2") if name not in weights]
        if missing:
            raise ValueError(f"scope verifier: the pair MLP's tensors {missing} are missing")
        self.mlp_dims = self.view_dims[:-1] if self.relation_tensors else list(self.view_dims)
        self.relation_weight = float(self.meta.get("relation_weight", 0.0)) if self.relation_tensors else 0.0
        self.w1 = np.asarray(weights["w1"], np.float32)  # (features, hidden)
        self.b1 = np.asarray(weights["b1"], np.float32)
        self.w2 = np.asarray(weights["w2"], np.float32)  # (hidden,)
        self.b2 = float(np.asarray(weights["b2"], np.float32).reshape(-1)[0])
        features = sum(2 * d + 1 for d in self.mlp_dims)
        if self.w1.shape[0] != features or self.w1.shape[1] != self.b1.shape[0] or self.w2.shape != self.b1.shape:
            raise ValueError(f"scope verifier: weights do not fit views of {self.view_dims} dims")

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
        if self.head != PAIR_MLP:
            raise ValueError(f"scope verifier: only the pair MLP weighs the relation view's cosine "
                             f"(this file's head is {self.head}; a blend takes its pair MLP's weight as trained)")
        return ScopeVerifier(self._weights(), {**self.meta, "relation_weight": str(weight)})

    def with_relation_view(self, tensors: Mapping[str, np.ndarray], settings: str, dim: int,
                           weight: float = 0.0, **meta: str) -> "ScopeVerifier":
        """This verifier (without a relation view) plus one: its adapter's tensors, settings (JSON) and
        width, and the weight on its cosine."""
        if self.relation_tensors:
            raise ValueError("scope verifier: it has a relation view already")
        if self.head != PAIR_MLP:
            raise ValueError(f"scope verifier: a {self.head} head is trained with its relation view; it cannot gain one")
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
        if self.head == SIMILARITY_ENSEMBLE:
            out = self._similarity_logits(a, b)
        elif self.head == BLEND:
            out = self.blend.combine(self._pair_mlp_logits(a, b), self._similarity_logits(a, b))
        else:
            out = self._pair_mlp_logits(a, b)
        if self.names_gate is not None:
            out = np.where(self._names_apart(a, b), -np.inf, out)
        return out

    def _similarity_logits(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.ensemble.logits(similarity_features(a, b, self.view_names, self.view_dims))

    def _pair_mlp_logits(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        width = sum(self.mlp_dims)
        hidden = np.maximum(pair_features(a[:, :width], b[:, :width], self.mlp_dims) @ self.w1 + self.b1, 0.0)
        out = hidden @ self.w2 + self.b2
        if self.relation_tensors:
            out = out + self.relation_weight * row_cosine(a[:, width:], b[:, width:])
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

    @property
    def tensors(self) -> dict[str, np.ndarray]:
        """Every tensor the file holds (head weights and relation adapter)."""
        return self._weights()

    def _weights(self) -> dict[str, np.ndarray]:
        weights = dict(self.relation_tensors)
        if self.head in (SIMILARITY_ENSEMBLE, BLEND):
            weights.update(self.ensemble.tensors)
        if self.head in (PAIR_MLP, BLEND):
            weights.update({"w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": np.array([self.b2], np.float32)})
        return weights

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
