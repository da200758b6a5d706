"""Serving-benchmark workloads: text prompts with the output length each request asks for.

Synthetic prompts are random token ids decoded to text and re-encoded until the text has
exactly the intended length under the benchmark's tokenizer (a decode/encode round trip can
merge or split tokens). The server's own count, from its usage report, is what gets reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pagoda.bench.datasets import allowed_token_ids, length_range, special_token_ids

DATASETS = ("random", "sharegpt", "shared-prefix", "prompts")
MAX_DATASET_FILE_BYTES = 1 << 30
# ShareGPT filtering, as the common serving benchmarks do it
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT_LEN = 1024
SHAREGPT_MAX_TOTAL_LEN = 2048


@dataclass(slots=True)
class ServeRequest:
    """One request of a serving benchmark."""

    prompt: str
    max_tokens: int
    prompt_len: int | None = None  # under the benchmark's tokenizer, where one is known


@dataclass(slots=True)
class DatasetSpec:
    """Which workload to build and its parameters (the CLI's dataset flags)."""

    name: str = "random"
    num_prompts: int = 1000
    seed: int = 0
    path: str | None = None
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    random_prefix_len: int = 0
    num_prefix_groups: int = 4
    prompts_per_group: int = 8
    shared_prefix_len: int = 512
    shared_suffix_len: int = 64
    output_len: int | None = None  # sharegpt: overrides the reply's length; others: default 128


def build_dataset(spec: DatasetSpec, tokenizer: Any | None) -> list[ServeRequest]:
    """The requests `spec` describes; synthetic datasets need a tokenizer."""
    if spec.name not in DATASETS:
        raise ValueError(f"unknown dataset {spec.name!r}; choose from {', '.join(DATASETS)}")
    if spec.num_prompts < 1:
        raise ValueError("--num-prompts must be at least 1")
    if spec.name == "prompts":
        return prompt_file_dataset(_need_path(spec), spec.num_prompts, spec.output_len or 128,
                                   tokenizer)
    if tokenizer is None:
        raise ValueError(f"the {spec.name} dataset needs a tokenizer: pass --tokenizer")
    if spec.name == "random":
        return random_dataset(tokenizer, spec.num_prompts, spec.random_input_len,
                              spec.random_output_len, spec.random_range_ratio,
                              spec.random_prefix_len, spec.seed)
    if spec.name == "sharegpt":
        return sharegpt_dataset(_need_path(spec), tokenizer, spec.num_prompts, spec.output_len,
                                spec.seed)
    return shared_prefix_dataset(tokenizer, spec.num_prefix_groups, spec.prompts_per_group,
                                 spec.shared_prefix_len, spec.shared_suffix_len,
                                 spec.output_len or 128, spec.seed)


def _need_path(spec: DatasetSpec) -> Path:
    if not spec.path:
        raise ValueError(f"the {spec.name} dataset needs --dataset-path")
    path = Path(spec.path).expanduser()
    if not path.is_file():
        raise ValueError(f"dataset file {path} does not exist")
    if path.stat().st_size > MAX_DATASET_FILE_BYTES:
        raise ValueError(f"dataset file {path} is larger than {MAX_DATASET_FILE_BYTES} bytes")
    return path


class PromptMaker:
    """Random text of an exact token length under one tokenizer."""

    def __init__(self, tokenizer: Any, rng: np.random.Generator) -> None:
        self.tokenizer = tokenizer
        self.rng = rng
        self.vocab = allowed_token_ids(len(tokenizer), special_token_ids(tokenizer))

    def random_ids(self, length: int) -> list[int]:
        return self.rng.choice(self.vocab, size=length).tolist()

    def text(self, token_ids: list[int]) -> tuple[str, int]:
        """`token_ids` as text whose re-encoding has the same length (or as close as the
        tokenizer allows in a few rounds), and that length."""
        target = len(token_ids)
        ids = token_ids
        for _ in range(8):
            text = self.tokenizer.decode(ids)
            encoded = self.encode(text)
            if len(encoded) == target:
                return text, target
            if len(encoded) > target:
                ids = encoded[:target]
            else:
                ids = encoded + self.random_ids(target - len(encoded))
        return text, len(encoded)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)


def random_dataset(tokenizer: Any, num: int, input_len: int, output_len: int,
                   range_ratio: float = 0.0, prefix_len: int = 0,
                   seed: int = 0) -> list[ServeRequest]:
    """Random prompts of [len*(1-r), len*(1+r)] tokens after a random prefix every prompt
    shares, each asking for [out*(1-r), out*(1+r)] tokens."""
    if prefix_len < 0:
        raise ValueError("--random-prefix-len must be >= 0")
    rng = np.random.default_rng(seed)
    maker = PromptMaker(tokenizer, rng)
    in_low, in_high = length_range(input_len, range_ratio)
    out_low, out_high = length_range(output_len, range_ratio)
    input_lens = rng.integers(in_low, in_high, size=num, endpoint=True)
    output_lens = rng.integers(out_low, out_high, size=num, endpoint=True)
    prefix = maker.random_ids(prefix_len)
    requests = []
    for n, m in zip(input_lens, output_lens, strict=True):
        text, length = maker.text(prefix + maker.random_ids(int(n)))
        requests.append(ServeRequest(text, int(m), length))
    return requests


def shared_prefix_dataset(tokenizer: Any, num_groups: int, prompts_per_group: int,
                          prefix_len: int, suffix_len: int, output_len: int,
                          seed: int = 0) -> list[ServeRequest]:
    """`num_groups` × `prompts_per_group` prompts: each group shares a random prefix of
    `prefix_len` tokens, each prompt adds its own `suffix_len` tokens; shuffled."""
    if num_groups < 1 or prompts_per_group < 1:
        raise ValueError("shared-prefix groups and prompts per group must be at least 1")
    if prefix_len < 1 or suffix_len < 1 or output_len < 1:
        raise ValueError("shared-prefix lengths must be at least 1")
    rng = np.random.default_rng(seed)
    maker = PromptMaker(tokenizer, rng)
    requests = []
    for _ in range(num_groups):
        prefix_text, _ = maker.text(maker.random_ids(prefix_len))
        for _ in range(prompts_per_group):
            suffix_text, _ = maker.text(maker.random_ids(suffix_len))
            text = prefix_text + " " + suffix_text
            requests.append(ServeRequest(text, output_len, len(maker.encode(text))))
    order = rng.permutation(len(requests))
    return [requests[i] for i in order]


def sharegpt_dataset(path: Path, tokenizer: Any, num: int, output_len: int | None = None,
                     seed: int = 0) -> list[ServeRequest]:
    """First human turn of each ShareGPT conversation as the prompt; the reply's token length
    as max_tokens unless `output_len` is given. Too short or too long pairs are skipped."""
    conversations = _load_json_list(path)
    order = np.random.default_rng(seed).permutation(len(conversations))
    requests: list[ServeRequest] = []
    for i in order:
        pair = _first_exchange(conversations[i])
        if pair is None:
            continue
        prompt_len = len(tokenizer.encode(pair[0], add_special_tokens=False))
        reply_len = output_len or len(tokenizer.encode(pair[1], add_special_tokens=False))
        if not _sharegpt_lengths_ok(prompt_len, reply_len, output_len is not None):
            continue
        requests.append(ServeRequest(pair[0], reply_len, prompt_len))
        if len(requests) == num:
            break
    if not requests:
        raise ValueError(f"{path} holds no usable ShareGPT conversation")
    return requests


def _load_json_list(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of conversations")
    return data


def _first_exchange(entry: Any) -> tuple[str, str] | None:
    """(first human message, the reply after it) of one ShareGPT entry, if it has them."""
    turns = entry.get("conversations") if isinstance(entry, dict) else None
    if not isinstance(turns, list) or len(turns) < 2:
        return None
    first, second = turns[0], turns[1]
    if not (isinstance(first, dict) and isinstance(second, dict)):
        return None
    prompt, reply = first.get("value"), second.get("value")
    if first.get("from") not in ("human", "user") or not isinstance(prompt, str) \
            or not isinstance(reply, str):
        return None
    return prompt, reply


def _sharegpt_lengths_ok(prompt_len: int, reply_len: int, fixed_output: bool) -> bool:
    if prompt_len < SHAREGPT_MIN_LEN or (not fixed_output and reply_len < SHAREGPT_MIN_LEN):
        return False
    return prompt_len <= SHAREGPT_MAX_PROMPT_LEN and \
        prompt_len + reply_len <= SHAREGPT_MAX_TOTAL_LEN


def prompt_file_dataset(path: Path, num: int, output_len: int,
                        tokenizer: Any | None = None) -> list[ServeRequest]:
    """Prompts from a file: `.jsonl` lines with "prompt" (and optionally "max_tokens"), or
    plain text with one prompt per non-blank line. Cycled when `num` exceeds the file."""
    if output_len < 1:
        raise ValueError("--output-len must be at least 1")
    entries = _read_prompt_file(path, output_len)
    if not entries:
        raise ValueError(f"{path} holds no prompts")
    requests = []
    for i in range(num):
        prompt, max_tokens = entries[i % len(entries)]
        length = len(tokenizer.encode(prompt, add_special_tokens=False)) if tokenizer else None
        requests.append(ServeRequest(prompt, max_tokens, length))
    return requests


def _read_prompt_file(path: Path, output_len: int) -> list[tuple[str, int]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        return [(line, output_len) for line in lines if line.strip()]
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            prompt, max_tokens = item["prompt"], int(item.get("max_tokens", output_len))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ValueError(f"{path}:{number}: expected {{\"prompt\": ..., "
                             f"\"max_tokens\": optional}}") from None
        if not isinstance(prompt, str) or max_tokens < 1:
            raise ValueError(f"{path}:{number}: prompt must be a string, max_tokens >= 1")
        entries.append((prompt, max_tokens))
    return entries
