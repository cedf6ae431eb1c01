"""The string helpers at the bottom of the layering (melo_ray/text.py)."""
from __future__ import annotations

from melo_ray.text import content_words, cut_at_stop, focus, normalise_label


def test_the_earliest_stop_string_cuts_and_an_empty_one_never_does():
    assert cut_at_stop("Paris. Then Rome\nand more", ["\n", "."]) == ("Paris", True)
    assert cut_at_stop("Paris", ["", "x"]) == ("Paris", False)
    assert cut_at_stop("", ["."]) == ("", False)


def test_labels_focus_and_content_words():
    assert normalise_label(" Ｌｉｍａ \t city ") == "Lima city"  # NFKC and white space
    assert focus("Some unrelated text here. Who wrote the play Hamlet?") == "Who wrote the play Hamlet?"
    assert content_words("Which family does {} belong to? Families!") == ["familie", "family"]
