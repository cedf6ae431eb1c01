"""Pure string helpers that several layers share (data conversion, the scope test, editors, metrics,
serving). They import nothing of the project, so anything may import them."""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

_SENTENCE_END = re.compile(r"(?<=[.!?;:\"])\s+|\s*\n\s*")
_STOPWORDS = frozenset(
    "a an the of in on at to for by with from and or is are was were be been being does do did has have had "
    "what which who whom whose when where why how that this it its it's as into than then there their his her "
    "name called belong belongs belonged".split()
)


def normalise_label(text: str) -> str:
    """Labels are compared exactly after Unicode and white-space normalisation."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def focus(prompt: str, min_words: int = 4) -> str:
    """The prompt's last sentence (joined with the ones before it until it has `min_words` words):
    CounterFact-style rewordings put the question after unrelated sentences."""
    parts = [p for p in _SENTENCE_END.split(prompt.strip()) if p]
    if not parts:
        return prompt
    i = len(parts) - 1
    out = parts[i]
    while len(out.split()) < min_words and i > 0:
        i -= 1
        out = parts[i] + " " + out
    return out


def content_words(text: str, *, keep_repeats: bool = False) -> list[str]:
    """Lower-case words of three letters or more that are not stop words, a trailing "s" dropped."""
    words = [w.rstrip("s") for w in re.findall(r"[a-z]+", text.replace("{}", " ").lower())
             if w not in _STOPWORDS and len(w) > 2]
    return words if keep_repeats else sorted(set(words))


def cut_at_stop(text: str, stops: Iterable[str]) -> tuple[str, bool]:
    """`text` up to the earliest of the stop strings, and whether one occurred (an empty stop never does)."""
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
