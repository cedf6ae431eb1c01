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
`melo_ray.editors.melo.scope_training`, shipped as `scope_verifier.safetensors` (weights, and its
settings in the safetensors metadata: no pickle), and copied into every index snapshot so a snapshot
always routes the way it did when it was written.
"""
from __future__ import annotations

import json
import re
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import safetensors.numpy

from melo_ray.editors.melo.scope_policy import ScopePolicy
from melo_ray.text import content_words, focus

BUILTIN_VERIFIER = Path(__file__).with_name("scope_verifier.safetensors")


# Words that open a sentence without naming anything: kept by `masked`, every other capitalised word
# (or one with a digit) is taken for part of a name.
_STARTERS = frozenset(
    "the a an what which who whom whose when where why how in on at is are was were does do did it its this that "
    "there to for of by from with as after before during since if they he she his her their we you i".split()
)
_TOKEN = re.compile(r"\w[\w'’.-]*|[^\w\s]")
_NAME_JOINERS = re.compile(r"X (?:of|de|and|the|von|van|der|la|le|du|da|del|di) X")


def _split_names(prompt: str, whole: bool = False) -> tuple[list[str], list[str]]:
    """The focus's (`whole`: the prompt's) tokens with each name-like run replaced by "X", and the
    name-like tokens themselves."""
    out: list[str] = []
    names: list[str] = []
    in_name = False
    tokens = _TOKEN.findall(prompt if whole else focus(prompt))
    for i, token in enumerate(tokens):
        starter = (i == 0 or tokens[i - 1] in ".?!") and token.lower() in _STARTERS
        name_like = token[0].isalnum() and any(c.isupper() or c.isdigit() for c in token) and not starter
        if name_like:
            names.append(token)
            if not in_name:
                out.append("X")
            in_name = True
        else:
            out.append(token)
            in_name = False
    return out, names


def masked(prompt: str) -> str:
    """The focus with every name-like run of words replaced by "X": what is asked, not about whom
    ("The gender of Ingrida Amantova is" -> "The gender of X is")."""
    return _NAME_JOINERS.sub("X", " ".join(_split_names(prompt)[0]))


def relation_text(prompt: str) -> str:
    """What the relation view reads: the focus, or the whole prompt when the focus names no one
    ("Where is Iglo? It is located in" asks about Iglo, and "It is located in" alone about nobody)."""
    text = focus(prompt)
    return text if _split_names(text, whole=True)[1] else prompt.strip()


TEXT_VIEWS = {"prompt": lambda p: p, "focus": focus, "masked": masked}  # views the MiniLM encoder embeds
WORDS_DIM = 256


def words(prompt: str, dim: int = WORDS_DIM) -> np.ndarray:
    """Token-level view: the content words of `masked(prompt)` (what is asked, names removed),
    hashed into a unit-length bag of `dim` counts; a prompt without any content word gets slot 0."""
    vector = np.zeros(dim, np.float32)
    for word in content_words(masked(prompt), keep_repeats=True):
        vector[zlib.crc32(word.encode()) % dim] += 1.0
    if not vector.any():
        vector[0] = 1.0
    return vector / np.linalg.norm(vector)


def names_in(prompt: str) -> list[str]:
    """The name-like words of the prompt's focus (what `masked` replaces by X)."""
    return _split_names(prompt)[1]


def names(prompt: str, dim: int = WORDS_DIM) -> np.ndarray:
    """Who is asked about: the character trigrams of the focus's name-like words (what `masked` takes
    out), hashed into a unit-length bag of `dim` counts; a prompt without names gets slot 0. Two
    prompts of one template about different subjects ("... of Call the Doctor's record label?" /
    "... of You'll See's record label?") differ here and nowhere else; trigrams keep an alias
    ("Emily Jones" / "Emily I Jones") close."""
    vector = np.zeros(dim, np.float32)
    for name in names_in(prompt):
        padded = f" {name.lower()} "
        for i in range(len(padded) - 2):
            vector[zlib.crc32(padded[i : i + 3].encode()) % dim] += 1.0
    if not vector.any():
        vector[0] = 1.0
    return vector / np.linalg.norm(vector)


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of rows a[i], b[i] (a broadcasts when it has one row)."""
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def _names_someone(vectors: np.ndarray) -> np.ndarray:
    """Rows of a names view that are not the no-names vector (slot 0 alone)."""
    return ~((np.abs(vectors[:, 0] - 1.0) < 1e-6) & (np.abs(vectors[:, 1:]).sum(1) < 1e-6))


HASHED_VIEWS = {"words": words, "names": names}  # views computed from the text alone, WORDS_DIM wide
# views a tuned encoder computes, its adapter carried in the verifier's file (relation.py)
TUNED_VIEWS = ("relation",)
VIEWS = (*TEXT_VIEWS, *HASHED_VIEWS, *TUNED_VIEWS)  # every view a verifier may name
RELATION_TENSOR_PREFIX = "relation."  # the relation view's adapter tensors inside the verifier file
RELATION_META_KEY = "relation_lora"  # its settings (JSON) in the file's metadata


def pair_features(a: np.ndarray, b: np.ndarray, view_dims: list[int]) -> np.ndarray:
    """Symmetric features of key pairs: per view (a slice of `view_dims[i]` columns) a*b, |a-b| of the
    unit-length slices and their cosine. a, b: (n, sum(view_dims))."""
    a = np.atleast_2d(a).astype(np.float32)
    b = np.atleast_2d(b).astype(np.float32)
    out = []
    start = 0
    for d in view_dims:
        va, vb = a[:, start : start + d], b[:, start : start + d]
        start += d
        na = va / np.maximum(np.linalg.norm(va, axis=1, keepdims=True), 1e-12)
        nb = vb / np.maximum(np.linalg.norm(vb, axis=1, keepdims=True), 1e-12)
        prod = na * nb
        out += [prod, np.abs(na - nb), prod.sum(1, keepdims=True)]
    return np.concatenate(out, axis=1)


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
            out = out + self.relation_weight * _row_cosine(a[:, width:], b[:, width:])
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
        return _row_cosine(*self._names_views(a, b))

    def _names_apart(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Rows whose prompts both name someone and whose names' trigram cosine is below the gate."""
        na, nb = self._names_views(a, b)
        return (_row_cosine(na, nb) < self.names_gate) & _names_someone(na) & _names_someone(nb)

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
    """The string metadata of a safetensors file (its JSON header's __metadata__)."""
    if len(data) < 8:
        raise ValueError("scope verifier: file is too short")
    size = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"scope verifier: header is not JSON ({exc})") from exc
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or "views" not in meta or "view_dims" not in meta:
        raise ValueError("scope verifier: metadata lacks views / view_dims")
    return meta


SAME_PROMPT_ATOL = 1e-5
NAMES_TIE = 1e-5  # names views are float32 unit vectors: equal bags agree to ~1e-7
NAMESAKE_COSINE = 0.5  # names trigram cosine below which a member never counts as naming what the query names


def _closest(names: np.ndarray) -> np.ndarray:
    """Which of the members' names cosines to a query are the highest, to the rounding tolerance."""
    return names >= names.max(initial=0.0) - NAMES_TIE


class ScopeTest:
    """The verifier plus its decision threshold, as the index applies it.

    Keys are the concatenated views the verifier names (`view_names`); the first view (the MiniLM key
    of the whole prompt) is the routing view the clusters and the HNSW graph use."""

    def __init__(self, verifier: ScopeVerifier, threshold: float, conflict_threshold: float | None = None,
                 latest_of_question: bool = True, prefer_same_names: bool = False, namesake_bar: float = 0.0,
                 closest_namesakes: bool = True, focus_reach: bool = False) -> None:
        self.verifier = verifier
        self.threshold = float(threshold)
        # None: only an identical prompt supersedes an earlier edit with another target
        self.conflict_threshold = conflict_threshold
        # a rewording goes to the latest edit of its question, not the member it resembles most
        self.latest_of_question = latest_of_question
        # among members that pass, those naming who the query names win ("Ferrari F40" over "Ferrari FXX")
        self.prefer_same_names = prefer_same_names and "names" in verifier.view_names
        if namesake_bar < 0:
            raise ValueError("scope namesake_bar must be >= 0")
        # the threshold rises by this much per e-fold of members naming what the query names (0: flat)
        self.namesake_bar = float(namesake_bar) if "names" in verifier.view_names else 0.0
        # k counts the members naming the query most closely; False: every one at NAMESAKE_COSINE or more
        # (snapshots written before the closest rule)
        self.closest_namesakes = closest_namesakes
        # a cluster also holds a query whose focus view (its last sentence) lies within its radius: a
        # rewording behind a long unrelated prefix is farther by the whole prompt than by its question
        self.focus_reach = focus_reach and "focus" in verifier.view_names
        if self.focus_reach and verifier.view_dims[verifier.view_names.index("focus")] != verifier.view_dims[0]:
            raise ValueError("scope focus_reach: the focus view must be as wide as the routing view")

    @classmethod
    def from_policy(cls, verifier: ScopeVerifier, policy: ScopePolicy) -> "ScopeTest":
        return cls(verifier, policy.threshold, policy.conflict_threshold, policy.latest_of_question,
                   policy.prefer_same_names, policy.namesake_bar, policy.closest_namesakes, policy.focus_reach)

    def policy(self, cluster_per_edit: bool) -> ScopePolicy:
        """The rules this test applies (as in effect: a rule its verifier cannot serve is off), plus the
        index's write-time rule, as one policy a snapshot carries whole."""
        return ScopePolicy(self.threshold, self.conflict_threshold, self.latest_of_question, self.prefer_same_names,
                           self.namesake_bar, self.closest_namesakes, self.focus_reach, cluster_per_edit)

    @property
    def key_dim(self) -> int:
        return self.verifier.key_dim

    @property
    def route_dim(self) -> int:
        return self.verifier.view_dims[0]

    @property
    def reach_starts(self) -> tuple[int, ...]:
        """Where each view that a cluster's radius is measured on starts in a key: the routing view, and
        with `focus_reach` the focus view (both MiniLM keys of a text, so both comparable to a centre)."""
        if not self.focus_reach:
            return (0,)
        return (0, sum(self.verifier.view_dims[: self.verifier.view_names.index("focus")]))

    def logits(self, query: np.ndarray, members: np.ndarray) -> np.ndarray:
        """Logit per member that it asks what `query` asks; identical keys always pass (+inf)."""
        members = np.atleast_2d(members)
        out = self.verifier.logits(np.asarray(query)[None, :], members).astype(np.float64)
        # one prompt's keys differ by ~1e-7 between encoder batches (padding changes the float sums),
        # so "identical" allows a little more than that
        identical = np.all(np.abs(members - np.asarray(query)[None, :]) <= SAME_PROMPT_ATOL, axis=1)
        out[identical] = np.inf
        return out

    def names_to(self, query: np.ndarray, members: np.ndarray) -> np.ndarray:
        """Names cosine of each member to `query`, computed once per routed query for the rules below
        that read it; all ones when neither rule is on (every member ties)."""
        members = np.atleast_2d(members)
        if not (self.prefer_same_names or self.namesake_bar):  # both set only with a names view
            return np.ones(members.shape[0])
        return self.verifier.names_cosine(np.asarray(query)[None, :], members)

    def bar(self, names: np.ndarray) -> float:
        """The logit a member must reach, given every member's `names_to` the query: the threshold,
        raised by `namesake_bar` x ln(k) for the k members that name what the query names. Each of them
        is one more chance for a question about their subject that none of them asks to pass by
        mistake; with a logistic tail, k chances at threshold + ln(k) err about as often as one at the
        threshold. The k are the members naming it most closely (and at least `NAMESAKE_COSINE`): one
        subject's edits share a names view, while "David Mellor" beside "David Yost" or "Windows 7"
        beside "Windows XP" is another subject, which the ranking rule puts behind the query's own."""
        if not self.namesake_bar:
            return self.threshold
        namesakes = names >= NAMESAKE_COSINE
        if self.closest_namesakes:
            namesakes &= _closest(names)
        return self.threshold + self.namesake_bar * float(np.log(max(int(namesakes.sum()), 1)))

    def closest_names(self, names: np.ndarray) -> np.ndarray:
        """Which members (given their `names_to` the query) name what it names most closely, to a
        rounding tolerance; all of them when the ranking rule is off."""
        if not self.prefer_same_names:
            return np.ones(len(names), bool)
        return _closest(names)

    def same_names(self, query: np.ndarray, members: np.ndarray) -> np.ndarray:
        """Which members name exactly what `query` names (all of them when the ranking rule is off)."""
        if not self.prefer_same_names:
            return np.ones(np.atleast_2d(members).shape[0], bool)
        return self.names_to(query, members) >= 1.0 - NAMES_TIE

    def supersedes(self, query: np.ndarray, members: np.ndarray) -> np.ndarray:
        """Which members an edit of `query` with another target replaces (conflict rule)."""
        limit = np.inf if self.conflict_threshold is None else self.conflict_threshold
        return self.logits(query, members) >= limit


def load_verifier(source: str) -> ScopeVerifier:
    """`builtin` (the verifier shipped beside this module) or a path to a verifier file."""
    path = BUILTIN_VERIFIER if source == "builtin" else Path(source)
    try:
        return ScopeVerifier.load(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"index.scope_verifier: no verifier file at {path}") from exc
