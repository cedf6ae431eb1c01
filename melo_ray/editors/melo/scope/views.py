"""Views of a prompt that the scope model reads: what it asks and about whom.

Text views the MiniLM encoder embeds (the prompt, its *focus*: the last sentence, and the focus with
names masked out: what is asked, not about whom), two hashed token views computed from the text alone
(the content words of the masked focus; the character trigrams of the names it took out), and the
*relation* view, which a tuned encoder computes (relation.py). Also the symmetric pair features the
verifier's MLP reads.
"""
from __future__ import annotations

import re
import zlib

import numpy as np

from melo_ray.text import content_words, focus



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


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of rows a[i], b[i] (a broadcasts when it has one row)."""
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def names_someone(vectors: np.ndarray) -> np.ndarray:
    """Rows of a names view that are not the no-names vector (slot 0 alone)."""
    return ~((np.abs(vectors[:, 0] - 1.0) < 1e-6) & (np.abs(vectors[:, 1:]).sum(1) < 1e-6))


HASHED_VIEWS = {"words": words, "names": names}  # views computed from the text alone, WORDS_DIM wide
# views a tuned encoder computes, its adapter carried in the verifier's file (relation.py)
TUNED_VIEWS = ("relation",)
VIEWS = (*TEXT_VIEWS, *HASHED_VIEWS, *TUNED_VIEWS)  # every view a verifier may name
RELATION_TENSOR_PREFIX = "relation."  # the relation view's adapter tensors inside the verifier file
RELATION_META_KEY = "relation_lora"  # its settings (JSON) in the file's metadata


def similarity_features(a: np.ndarray, b: np.ndarray, view_names: list[str], view_dims: list[int]) -> np.ndarray:
    """Direction-free features of key pairs: each view's cosine, then (with a names view) whether both
    prompts name someone and whether exactly one does. A model over these cannot learn where a relation
    sits in embedding space, only how alike two prompts are in each view: what carries to relations it
    never saw (docs/scope_validation.md, "Fifth session"). a, b: (n, sum(view_dims))."""
    a, b = np.atleast_2d(a).astype(np.float32), np.atleast_2d(b).astype(np.float32)
    starts = np.cumsum([0, *view_dims])
    out = [row_cosine(a[:, starts[i] : starts[i + 1]], b[:, starts[i] : starts[i + 1]]) for i in range(len(view_dims))]
    if "names" in view_names:
        i = view_names.index("names")
        named_a = names_someone(a[:, starts[i] : starts[i + 1]])
        named_b = names_someone(b[:, starts[i] : starts[i + 1]])
        out += [named_a & named_b, named_a != named_b]
    return np.stack(out, axis=1).astype(np.float32)


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


