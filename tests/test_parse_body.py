"""Request bodies are checked before anything else sees them: no input reaches a 500."""
from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from melo_ray.serving.requests import MAX_DEPTH, ApiError, CompletionsBody, GenerateBody, parse_body


def test_a_lone_surrogate_is_a_400_naming_the_field():
    with pytest.raises(ApiError) as caught:
        parse_body(b'{"prompts": ["ok", "\\udcff"]}', GenerateBody, 10_000)
    assert caught.value.status == 400 and caught.value.param == "prompts.1"


def test_a_body_nested_100000_levels_is_a_400():
    with pytest.raises(ApiError) as caught:
        parse_body(b"[" * 100_000 + b"]" * 100_000, GenerateBody, 10_000_000)
    assert caught.value.status == 400 and "nested" in caught.value.message
    with pytest.raises(ApiError, match="nested more than"):
        parse_body(b'{"prompts": ' + b"[" * (MAX_DEPTH + 5) + b"]" * (MAX_DEPTH + 5) + b"}", GenerateBody, 10_000)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(st.characters(codec=None)),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=15))
def test_any_json_value_is_a_model_or_a_4xx(value):
    body = json.dumps(value).encode()
    for model in (GenerateBody, CompletionsBody):
        try:
            parse_body(body, model, 100_000)
        except ApiError as exc:
            assert 400 <= exc.status < 500 and exc.message
