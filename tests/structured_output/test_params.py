"""Structured-output parameters: exactly one constraint, bounded sizes, choice grammars."""

from __future__ import annotations

import pytest

from pagoda.errors import InvalidRequestError
from pagoda.structured_output.params import (
    MAX_CHOICES,
    MAX_SPEC_CHARS,
    StructuredOutputsParams,
    choice_grammar,
)


@pytest.mark.parametrize("kwargs, kind", [
    ({"json": '{"type": "object"}'}, "json"), ({"json_object": True}, "json_object"),
    ({"regex": "a+"}, "regex"), ({"choice": ["x", "y"]}, "choice"),
    ({"grammar": 'root ::= "a"'}, "grammar"),
])
def test_each_kind(kwargs, kind):
    assert StructuredOutputsParams(**kwargs).kind == kind


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one"),
    ({"regex": "a", "choice": ["b"]}, "exactly one"),
    ({"regex": ""}, "non-empty"),
    ({"regex": "a" * (MAX_SPEC_CHARS + 1)}, "at most"),
    ({"choice": ["x"] * (MAX_CHOICES + 1)}, "at most"),
    ({"choice": ["ok", ""]}, "non-empty"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": "[1, 2]"}, "must be an object"),
    ({"json": "[" * 100_000 + "]" * 100_000}, "not valid JSON"),  # recursion, not a crash
])
def test_bad_constraints_are_invalid_requests(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        StructuredOutputsParams(**kwargs)



def test_choice_grammar_escapes_every_literal():
    import xgrammar as xgr
    options = ['say "hi"', "back\\slash", "new\nline", "tab\t", "ünïcode ✓"]
    grammar = choice_grammar(options)  # compiled from text, as GrammarCompiler does
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo(["a", "b"]))  # strings are matched by char
    compiled = compiler.compile_grammar(grammar)
    for option in options:
        matcher = xgr.GrammarMatcher(compiled)
        assert matcher.accept_string(option) and matcher.is_completed(), option
    matcher = xgr.GrammarMatcher(compiled)
    assert not matcher.accept_string('say "ho"')
