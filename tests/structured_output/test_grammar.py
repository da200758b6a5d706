"""Grammar compilation (errors, time limit) and the matcher following sampled tokens."""

from __future__ import annotations

import pytest
import torch

from pagoda.errors import InvalidRequestError
from pagoda.structured_output.bitmask import BitmaskFiller, apply_bitmask
from pagoda.structured_output.grammar import GrammarCompiler, GrammarMatcherState
from pagoda.structured_output.params import StructuredOutputsParams as Spec


@pytest.fixture(scope="module")
def compiler(smollm2_tokenizer):
    return GrammarCompiler(lambda: smollm2_tokenizer, 49152)


@pytest.mark.parametrize("spec, message", [
    (Spec(json='{"type": "objec"}'), 'invalid json constraint: Unsupported type "objec"'),
    (Spec(json='{"type": "integer", "minimum": 5, "maximum": 1}'), "minimum greater"),
    (Spec(regex="[a-"), "invalid regex constraint: Regex parsing error"),
    (Spec(regex=r"(a)\1"), "Backreference"),
    (Spec(grammar="root ::= undefined_rule"), "invalid grammar constraint"),
])
def test_bad_constraints_are_400s_with_a_clean_message(compiler, spec, message):
    with pytest.raises(InvalidRequestError, match=message) as info:
        compiler.compile(spec)
    assert ".cc:" not in info.value.message  # xgrammar's C++ log prefix is stripped


def test_a_slow_compile_is_refused(smollm2_tokenizer):
    slow = GrammarCompiler(lambda: smollm2_tokenizer, 49152, timeout_s=1e-9)
    with pytest.raises(InvalidRequestError, match="took more than"):
        slow.compile(Spec(json='{"type": "object", "properties": {"a": {"type": "string"}}}'))


def test_models_without_a_tokenizer_refuse_constraints():
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        GrammarCompiler(lambda: None, 100).compile(Spec(regex="a"))


def test_matcher_masks_and_follows_tokens(compiler, smollm2_tokenizer):
    state = GrammarMatcherState(compiler.compile(Spec(choice=["yes", "no"])))
    bitmask = BitmaskFiller(49152).fill([state])
    logits = torch.zeros(1, 49152)
    apply_bitmask(logits, bitmask, [0])
    allowed = {smollm2_tokenizer.decode([t]) for t in torch.isfinite(logits[0]).nonzero()[:, 0]}
    assert allowed and all("yes".startswith(a) or "no".startswith(a) for a in allowed)
    for token in smollm2_tokenizer.encode("no", add_special_tokens=False):
        assert state.accept(token)
    assert not state.is_terminated
    assert state.accept(smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>"))
    assert state.is_terminated
