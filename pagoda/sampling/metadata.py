"""Per-step sampling state: python rows in, batched device tensors out."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pagoda.sampling_params import SamplingParams


@dataclass(slots=True)
class SamplingRow:
    """What the sampler needs to know about one row (one sequence) of the batch."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None  # present iff the request has a seed
    eos_token_id: int | None = None


@dataclass(slots=True)
class LogitBias:
    """Sparse additive biases: logits[rows[i], tokens[i]] += values[i]."""

    rows: Tensor  # [N] int64
    tokens: Tensor  # [N] int64
    values: Tensor  # [N] float32


@dataclass(slots=True)
class TokenMask:
    """Sparse (row, token) pairs whose logits are forced to -inf."""

    rows: Tensor  # [N] int64
    tokens: Tensor  # [N] int64


@dataclass(slots=True)
class Penalties:
    """Per-row penalty factors and the token statistics they act on."""

    presence: Tensor  # [B] float32
    frequency: Tensor  # [B] float32
    repetition: Tensor  # [B] float32
    output_counts: Tensor  # [B, V] float32, occurrences of each token in the output so far
    prompt_mask: Tensor | None  # [B, V] bool, tokens in the prompt; None when no repetition penalty


@dataclass(slots=True)
class SamplingMetadata:
    """Batched sampling parameters on the target device; optional parts are None when unused."""

    batch_size: int
    vocab_size: int
    all_greedy: bool
    all_random: bool
    greedy_mask: Tensor | None = None  # [B] bool, only for batches mixing greedy and random rows
    temperature: Tensor | None = None  # [B] float32 (1.0 for greedy rows); None when all 1.0
    min_p: Tensor | None = None  # [B] float32, 0.0 = off
    top_k: Tensor | None = None  # [B] int64, 0 = off
    max_top_k: int = 0  # largest enabled top_k in the batch
    top_p: Tensor | None = None  # [B] float32, 1.0 = off
    logit_bias: LogitBias | None = None
    stop_mask: TokenMask | None = None  # eos/stop ids of rows still short of min_tokens
    penalties: Penalties | None = None
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # seeded random rows
    max_num_logprobs: int | None = None

    @classmethod
    def build(cls, rows: list[SamplingRow], vocab_size: int,
              device: torch.device) -> SamplingMetadata:
        """Gather the rows' parameters into tensors on `device`."""
        params = [r.params for r in rows]
        random = [not p.is_greedy for p in params]
        top_k, max_top_k = _top_k(params, random, vocab_size, device)
        return cls(
            batch_size=len(rows),
            vocab_size=vocab_size,
            all_greedy=not any(random),
            all_random=all(random),
            greedy_mask=_greedy_mask(random, device),
            temperature=_random_row_values(params, random, lambda p: p.temperature, 1.0, device),
            min_p=_random_row_values(params, random, lambda p: p.min_p, 0.0, device),
            top_k=top_k,
            max_top_k=max_top_k,
            top_p=_random_row_values(params, random, lambda p: p.top_p, 1.0, device),
            logit_bias=_logit_bias(params, vocab_size, device),
            stop_mask=_stop_mask(rows, vocab_size, device),
            penalties=_penalties(rows, vocab_size, device),
            generators={i: r.generator for i, r in enumerate(rows)
                        if r.generator is not None and random[i]},
            max_num_logprobs=max((p.logprobs for p in params if p.logprobs is not None),
                                 default=None),
        )


def to_device(values, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A tensor of `values` on `device`. To a GPU it goes through pinned memory without
    waiting: a plain copy would wait for everything already queued (with async scheduling,
    the whole step in flight)."""
    tensor = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A request's own random generator on `device`, seeded once for its lifetime."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _greedy_mask(random: list[bool], device: torch.device) -> Tensor | None:
    if all(random) or not any(random):
        return None
    return to_device([not r for r in random], torch.bool, device)


def _random_row_values(params: list[SamplingParams], random: list[bool],
                       value: Callable[[SamplingParams], float], neutral: float,
                       device: torch.device) -> Tensor | None:
    """A float32 [B] tensor of one parameter (neutral on greedy rows), or None if all neutral."""
    values = [float(value(p)) if r else neutral for p, r in zip(params, random)]
    if all(v == neutral for v in values):
        return None
    return to_device(values, torch.float32, device)


def _top_k(params: list[SamplingParams], random: list[bool], vocab_size: int,
           device: torch.device) -> tuple[Tensor | None, int]:
    """Per-row k (0 = off, also when k covers the vocabulary) and the batch's largest k."""
    ks = [p.top_k if r and 0 < p.top_k < vocab_size else 0 for p, r in zip(params, random)]
    if not any(ks):
        return None, 0
    return to_device(ks, torch.int64, device), max(ks)


def _logit_bias(params: list[SamplingParams], vocab_size: int,
                device: torch.device) -> LogitBias | None:
    entries = [(i, token, bias) for i, p in enumerate(params)
               for token, bias in (p.logit_bias or {}).items() if 0 <= token < vocab_size]
    if not entries:
        return None
    rows, tokens, values = zip(*entries)
    index = to_device([rows, tokens], torch.int64, device)
    return LogitBias(index[0], index[1], to_device(values, torch.float32, device))


def _stop_mask(rows: list[SamplingRow], vocab_size: int, device: torch.device) -> TokenMask | None:
    """eos and stop token ids of every row whose output is still shorter than min_tokens."""
    pairs = [(i, token) for i, r in enumerate(rows)
             if len(r.output_token_ids) < r.params.min_tokens
             for token in _stop_ids(r) if 0 <= token < vocab_size]
    if not pairs:
        return None
    index = to_device(pairs, torch.int64, device).T
    return TokenMask(index[0], index[1])


def _stop_ids(row: SamplingRow) -> set[int]:
    # Like vLLM, eos is blocked even with ignore_eos.
    eos = {row.eos_token_id} if row.eos_token_id is not None else set()
    return set(row.params.stop_token_ids) | eos


def _penalties(rows: list[SamplingRow], vocab_size: int, device: torch.device) -> Penalties | None:
    penalized = [i for i, r in enumerate(rows) if r.params.uses_penalties]
    if not penalized:
        return None
    repeated = [i for i in penalized if rows[i].params.repetition_penalty != 1.0]
    factors = to_device(
        [[r.params.presence_penalty, r.params.frequency_penalty, r.params.repetition_penalty]
         for r in rows], torch.float32, device)
    shape = (len(rows), vocab_size)
    return Penalties(
        presence=factors[:, 0],
        frequency=factors[:, 1],
        repetition=factors[:, 2],
        output_counts=_token_counts([rows[i].output_token_ids for i in penalized], penalized,
                                    shape, device),
        prompt_mask=_token_counts([rows[i].prompt_token_ids for i in repeated], repeated,
                                  shape, device).bool() if repeated else None,
    )


def _token_counts(seqs: list[Sequence[int]], row_ids: list[int], shape: tuple[int, int],
                  device: torch.device) -> Tensor:
    """A float32 [B, V] tensor counting each token of seqs[j] in row row_ids[j]."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    tokens = torch.tensor(list(itertools.chain.from_iterable(seqs)), dtype=torch.int64)
    rows = torch.repeat_interleave(torch.tensor(row_ids, dtype=torch.int64), lengths)
    index = to_device(torch.stack([rows, tokens]), torch.int64, device)
    counts = torch.zeros(shape, dtype=torch.float32, device=device)
    return counts.index_put_((index[0], index[1]), counts.new_ones(()), accumulate=True)
