"""Tests for incremental detokenization, stop strings and streaming deltas."""

from __future__ import annotations

import random
import string
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
from transformers import PreTrainedTokenizerFast

from pagoda.engine.detokenizer import IncrementalDetokenizer, decode_token

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Crème brûlée, naïve café, Ærøskøbing, Łódź, Ñandú",
    "日本語のテキストと中文文本，还有한국어.",
    "Emoji: 😀👍🏽 👨‍👩‍👧‍👦 🇯🇵 and ✨done✨",
    "  leading spaces\n\nblank lines\t\ttabs  \r\n trailing  ",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # comment\n",
    "mixed: abc日本😀é\n\t   end",
    "a",
    "\n",
]


class SlowTokenizer:
    """Exposes only the slow-tokenizer interface (no backend), forcing the offset fallback."""

    def __init__(self, fast: Any) -> None:
        self._fast = fast

    def convert_ids_to_tokens(self, ids: Any, skip_special_tokens: bool = False) -> Any:
        return self._fast.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._fast.convert_tokens_to_string(tokens)


def _byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny Llama-style tokenizer: metaspace normalizer, BPE with byte fallback, strip decoder."""
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    chars = ["▁", *string.ascii_letters, *string.digits, *string.punctuation]
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("i", "n"), ("o", "r")]
    merged = ["".join(pair) for pair in merges]
    vocab = {token: i for i, token in enumerate(specials + byte_tokens + chars + merged)}
    model = models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    backend = Tokenizer(model)
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        clean_up_tokenization_spaces=False,
    )


@pytest.fixture(scope="module")
def smollm(smollm2_tokenizer: Any) -> Any:
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def byte_fallback() -> PreTrainedTokenizerFast:
    return _byte_fallback_tokenizer()


@pytest.fixture(params=["smollm", "byte_fallback", "smollm_slow", "byte_fallback_slow"])
def any_tokenizer(request: pytest.FixtureRequest) -> tuple[Any, Any]:
    """(tokenizer under test, fast reference) for every tokenizer style and decode path."""
    name: str = request.param
    fast = request.getfixturevalue(name.removesuffix("_slow"))
    return (SlowTokenizer(fast) if name.endswith("_slow") else fast), fast


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _chunks(ids: Sequence[int], rng: random.Random | None) -> Iterator[list[int]]:
    """Split ids into chunks of 1 (rng None) or random sizes 1..5."""
    i = 0
    while i < len(ids):
        size = 1 if rng is None else rng.randint(1, 5)
        yield list(ids[i : i + size])
        i += size


def _run(
    det: IncrementalDetokenizer, ids: Sequence[int], rng: random.Random | None = None
) -> tuple[list[str], str | None]:
    """Feed ids like the engine does; return the streamed deltas and the stop string (if any)."""
    deltas: list[str] = []
    for chunk in _chunks(ids, rng):
        stop = det.update(chunk)
        deltas.append(det.get_delta(finished=stop is not None))
        if stop is not None:
            return deltas, stop
    deltas.append(det.get_delta(finished=True))
    return deltas, None


# --- decoding equals a full decode ----------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunked", [False, True])
def test_incremental_matches_full_decode(
    any_tokenizer: tuple[Any, Any], text: str, chunked: bool
) -> None:
    tokenizer, fast = any_tokenizer
    ids = _encode(fast, text)
    det = IncrementalDetokenizer(tokenizer, [])
    deltas, stop = _run(det, ids, random.Random(len(text)) if chunked else None)
    expected = fast.decode(ids, skip_special_tokens=True)
    assert stop is None
    assert det.output_text == expected
    assert "".join(deltas) == expected


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_with_prompt_context(any_tokenizer: tuple[Any, Any], text: str) -> None:
    tokenizer, fast = any_tokenizer
    prompt = _encode(fast, "A prompt with ünïcode 日本 and words:")
    ids = _encode(fast, text)
    det = IncrementalDetokenizer(tokenizer, prompt)
    deltas, _ = _run(det, ids, random.Random(7))
    prompt_text = fast.decode(prompt, skip_special_tokens=True)
    full = fast.decode(prompt + ids, skip_special_tokens=True)
    assert full.startswith(prompt_text)
    assert det.output_text == full[len(prompt_text) :]
    assert "".join(deltas) == det.output_text


def test_split_multibyte_chars_never_yield_replacement(any_tokenizer: tuple[Any, Any]) -> None:
    tokenizer, fast = any_tokenizer
    text = "日本語 😀👍🏽 Ærø 한국어 👨‍👩‍👧"
    ids = _encode(fast, text)
    partial = [i for i in ids if "\ufffd" in fast.decode([i])]
    assert partial, "the test text must contain characters split across tokens"
    for stop in ([], ["zz"]):
        det = IncrementalDetokenizer(tokenizer, [], stop=stop)
        deltas, _ = _run(det, ids)
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) == text


def test_incomplete_character_is_held_back_until_complete(smollm: Any) -> None:
    ids = _encode(smollm, "日")
    assert len(ids) > 1
    det = IncrementalDetokenizer(smollm, [])
    for token_id in ids[:-1]:
        det.update([token_id])
        assert det.output_text == ""
    det.update(ids[-1:])
    assert det.output_text == "日"


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(any_tokenizer: tuple[Any, Any], skip: bool) -> None:
    tokenizer, fast = any_tokenizer
    eos = fast.eos_token_id
    ids = _encode(fast, "Hi 日本 there") + [eos]
    det = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=skip)
    deltas, _ = _run(det, ids)
    assert det.output_text == fast.decode(ids, skip_special_tokens=skip)
    assert (fast.eos_token in det.output_text) is not skip
    assert "".join(deltas) == det.output_text


def test_long_output_keeps_slow_window_bounded(smollm: Any) -> None:
    ids = _encode(smollm, "word 日本 " * 400)
    det = IncrementalDetokenizer(SlowTokenizer(smollm), [])
    deltas, _ = _run(det, ids)
    assert "".join(deltas) == smollm.decode(ids)
    assert len(det._decoder.tokens) < 200  # type: ignore[attr-defined]


# --- stop strings ---------------------------------------------------------------------------

STOP_TEXT = "Hello world, the answer is 42. Done."


def _spans_tokens(tokenizer: Any, ids: list[int], stop: str) -> bool:
    """Whether no single token's text contains `stop` (so the match must cross tokens)."""
    return all(stop not in tokenizer.decode([i]) for i in ids)


def test_stop_split_across_tokens(smollm: Any) -> None:
    ids = _encode(smollm, STOP_TEXT)
    assert _spans_tokens(smollm, ids, " answer is")
    det = IncrementalDetokenizer(smollm, [], stop=[" answer is"])
    deltas, stop = _run(det, ids)
    assert stop == " answer is"
    assert det.output_text == "Hello world, the"
    assert "".join(deltas) == det.output_text


def test_stop_starting_inside_one_token_ending_in_another(any_tokenizer: tuple[Any, Any]) -> None:
    tokenizer, fast = any_tokenizer
    ids = _encode(fast, STOP_TEXT)
    det = IncrementalDetokenizer(tokenizer, [], stop=["swer i"])
    deltas, stop = _run(det, ids)
    assert stop == "swer i"
    assert det.output_text == "Hello world, the an"
    assert "".join(deltas) == det.output_text


@pytest.mark.parametrize("stops", [["answer", "answer is 42"], ["answer is 42", "answer"]])
def test_stop_that_is_prefix_of_another(smollm: Any, stops: list[str]) -> None:
    ids = _encode(smollm, STOP_TEXT)
    for rng in (None, random.Random(3)):
        det = IncrementalDetokenizer(smollm, [], stop=stops)
        deltas, stop = _run(det, ids, rng)
        assert stop == "answer"
        assert det.output_text == "Hello world, the "
        assert "".join(deltas) == det.output_text


def test_stop_completing_first_wins_over_earlier_start(smollm: Any) -> None:
    ids = _encode(smollm, STOP_TEXT)
    det = IncrementalDetokenizer(smollm, [], stop=["world, the answer is 42", "the"])
    _run(det, ids, random.Random(0))
    assert det.output_text == "Hello world, "


@pytest.mark.parametrize("chunked", [False, True])
def test_include_stop_str_in_output(any_tokenizer: tuple[Any, Any], chunked: bool) -> None:
    tokenizer, fast = any_tokenizer
    ids = _encode(fast, STOP_TEXT)
    det = IncrementalDetokenizer(tokenizer, [], stop=["is 4"], include_stop_str_in_output=True)
    deltas, stop = _run(det, ids, random.Random(5) if chunked else None)
    assert stop == "is 4"
    assert det.output_text == "Hello world, the answer is 4"
    assert "".join(deltas) == det.output_text


@pytest.mark.parametrize("stop_str", ["Hello", "He", "Hello world, the answer"])
def test_stop_at_first_token(smollm: Any, stop_str: str) -> None:
    ids = _encode(smollm, STOP_TEXT)
    det = IncrementalDetokenizer(smollm, [], stop=[stop_str])
    deltas, stop = _run(det, ids, random.Random(1) if len(stop_str) > 5 else None)
    assert stop == stop_str
    assert det.output_text == ""
    assert "".join(deltas) == ""
    if len(stop_str) <= 5:
        assert len(deltas) == 1  # matched on the very first token


def test_stop_text_in_prompt_does_not_trigger(smollm: Any) -> None:
    prompt = _encode(smollm, "Say STOP now")
    ids = _encode(smollm, " and then continue")
    det = IncrementalDetokenizer(smollm, prompt, stop=["STOP"])
    deltas, stop = _run(det, ids)
    assert stop is None
    assert "".join(deltas) == det.output_text == " and then continue"


def test_update_after_stop_is_ignored(smollm: Any) -> None:
    det = IncrementalDetokenizer(smollm, [], stop=["world"])
    assert det.update(_encode(smollm, "Hello world again")) == "world"
    assert det.update(_encode(smollm, " more")) is None
    assert det.output_text == "Hello "
    assert det.stop_reason == "world"


@pytest.mark.parametrize("include", [False, True])
def test_random_stops_never_leak(any_tokenizer: tuple[Any, Any], include: bool) -> None:
    tokenizer, fast = any_tokenizer
    rng = random.Random(1234)
    for _ in range(40):
        text = rng.choice(TEXTS[:8]) + " " + rng.choice(TEXTS[:8])
        ids = _encode(fast, text)
        decoded = fast.decode(ids)
        start = rng.randrange(len(decoded))
        stop_str = decoded[start : start + rng.randint(1, 8)]
        stops = [stop_str, "\x00never"]
        det = IncrementalDetokenizer(tokenizer, [], stop=stops, include_stop_str_in_output=include)
        deltas, stop = _run(det, ids, rng)
        cut = decoded.find(stop_str) + (len(stop_str) if include else 0)
        assert stop == stop_str
        assert det.output_text == decoded[:cut]
        assert "".join(deltas) == det.output_text
        if not include:
            assert stop_str not in "".join(deltas)


def test_holdback_released_on_finish(smollm: Any) -> None:
    ids = _encode(smollm, STOP_TEXT)
    det = IncrementalDetokenizer(smollm, [], stop=["xyzzy"])
    streamed = ""
    for token_id in ids:
        assert det.update([token_id]) is None
        streamed += det.get_delta(finished=False)
        assert len(det.output_text) - len(streamed) <= len("xyzzy") - 1
    assert streamed == STOP_TEXT[: len(streamed)]
    assert len(streamed) < len(STOP_TEXT)
    rest = det.get_delta(finished=True)
    assert streamed + rest == det.output_text == STOP_TEXT
    assert det.get_delta(finished=True) == ""


def test_no_holdback_without_stop_strings(smollm: Any) -> None:
    det = IncrementalDetokenizer(smollm, [])
    det.update(_encode(smollm, STOP_TEXT))
    assert det.get_delta(finished=False) == STOP_TEXT


def test_empty_stop_strings_are_ignored(smollm: Any) -> None:
    det = IncrementalDetokenizer(smollm, [], stop=[""])
    deltas, stop = _run(det, _encode(smollm, STOP_TEXT))
    assert stop is None and "".join(deltas) == STOP_TEXT


# --- decode_token ---------------------------------------------------------------------------


def test_decode_token_byte_level(smollm: Any) -> None:
    (hello,) = _encode(smollm, " hello")
    assert decode_token(smollm, hello) == " hello"
    partial = [i for i in _encode(smollm, "日本語😀") if "\ufffd" in smollm.decode([i])]
    for token_id in partial:
        assert decode_token(smollm, token_id) == smollm.convert_ids_to_tokens(token_id)
    assert decode_token(smollm, smollm.eos_token_id) == smollm.eos_token
    assert decode_token(smollm, 10**9) == ""


def test_decode_token_byte_fallback(byte_fallback: PreTrainedTokenizerFast) -> None:
    the, hello = _encode(byte_fallback, " the"), _encode(byte_fallback, "hello")
    assert byte_fallback.convert_ids_to_tokens(the) == ["▁", "▁the"]
    assert decode_token(byte_fallback, the[1]) == " the"
    assert decode_token(byte_fallback, hello[1]) == "he"
    byte_ids = _encode(byte_fallback, "日")[1:]
    assert [decode_token(byte_fallback, i) for i in byte_ids] == ["<0xE6>", "<0x97>", "<0xA5>"]
