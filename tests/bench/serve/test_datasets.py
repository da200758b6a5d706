"""Serving-benchmark datasets: exact synthetic lengths, ShareGPT filtering, prompt files."""

from __future__ import annotations

import json

import pytest

from pagoda.bench.serve.datasets import (
    DatasetSpec,
    build_dataset,
    prompt_file_dataset,
    random_dataset,
    shared_prefix_dataset,
    sharegpt_dataset,
)


def _encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_random_prompts_have_the_asked_lengths(smollm2_tokenizer):
    requests = random_dataset(smollm2_tokenizer, 20, input_len=40, output_len=10,
                              range_ratio=0.5, seed=3)
    assert len(requests) == 20
    for r in requests:
        assert 20 <= r.prompt_len <= 60 and 5 <= r.max_tokens <= 15
        assert len(_encode(smollm2_tokenizer, r.prompt)) == r.prompt_len
    assert len({r.prompt_len for r in requests}) > 1  # the range is used


def test_random_prompts_share_the_random_prefix(smollm2_tokenizer):
    requests = random_dataset(smollm2_tokenizer, 4, input_len=8, output_len=4, prefix_len=32)
    prefixes = [_encode(smollm2_tokenizer, r.prompt)[:24] for r in requests]
    assert all(p == prefixes[0] for p in prefixes)
    assert len({r.prompt for r in requests}) == 4


def test_random_dataset_is_seeded(smollm2_tokenizer):
    a = random_dataset(smollm2_tokenizer, 3, 16, 4, seed=1)
    b = random_dataset(smollm2_tokenizer, 3, 16, 4, seed=1)
    c = random_dataset(smollm2_tokenizer, 3, 16, 4, seed=2)
    assert [r.prompt for r in a] == [r.prompt for r in b] != [r.prompt for r in c]


def test_shared_prefix_groups(smollm2_tokenizer):
    requests = shared_prefix_dataset(smollm2_tokenizer, num_groups=3, prompts_per_group=4,
                                     prefix_len=48, suffix_len=8, output_len=5, seed=0)
    assert len(requests) == 12 and all(r.max_tokens == 5 for r in requests)
    groups: dict[tuple[int, ...], int] = {}
    for r in requests:
        key = tuple(_encode(smollm2_tokenizer, r.prompt)[:40])
        groups[key] = groups.get(key, 0) + 1
    assert sorted(groups.values()) == [4, 4, 4]


def test_sharegpt_takes_the_first_exchange_and_filters(tmp_path, smollm2_tokenizer):
    reply = "Paris is the capital of France and its largest city by far."
    data = [
        {"conversations": [{"from": "human", "value": "What is the capital of France?"},
                           {"from": "gpt", "value": reply}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        {"conversations": [{"from": "gpt", "value": "no human first turn here"},
                           {"from": "human", "value": "so this one is skipped"}]},
        {"id": "no conversations"},
        "not even an object",
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    requests = sharegpt_dataset(path, smollm2_tokenizer, num=10)
    assert [r.prompt for r in requests] == ["What is the capital of France?"]
    assert requests[0].max_tokens == len(_encode(smollm2_tokenizer, reply))
    fixed = sharegpt_dataset(path, smollm2_tokenizer, num=10, output_len=7)
    assert fixed[0].max_tokens == 7


def test_prompt_files_text_and_jsonl(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("first prompt\n\n  \nsecond prompt\n")
    requests = prompt_file_dataset(text, num=5, output_len=9)
    assert [r.prompt for r in requests] == ["first prompt", "second prompt"] * 2 + ["first prompt"]
    assert all(r.max_tokens == 9 and r.prompt_len is None for r in requests)
    lines = tmp_path / "prompts.jsonl"
    lines.write_text('{"prompt": "a", "max_tokens": 3}\n{"prompt": "b"}\n')
    assert [(r.prompt, r.max_tokens) for r in prompt_file_dataset(lines, 2, 11)] == \
        [("a", 3), ("b", 11)]


@pytest.mark.parametrize("content, message", [
    ('{"text": "no prompt key"}\n', "expected"),
    ('{"prompt": 5}\n', "must be a string"),
    ("not json\n", "expected"),
])
def test_bad_jsonl_lines_are_reported_with_their_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        prompt_file_dataset(path, 1, 4)


def test_build_dataset_refuses_what_it_cannot_build(tmp_path):
    with pytest.raises(ValueError, match="needs a tokenizer"):
        build_dataset(DatasetSpec(name="random", num_prompts=2), None)
    with pytest.raises(ValueError, match="needs --dataset-path"):
        build_dataset(DatasetSpec(name="prompts", num_prompts=2), None)
    with pytest.raises(ValueError, match="does not exist"):
        build_dataset(DatasetSpec(name="prompts", path=str(tmp_path / "missing.txt")), None)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset(DatasetSpec(name="nope"), None)
