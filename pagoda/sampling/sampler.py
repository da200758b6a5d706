"""The sampler: logits processing, greedy/random token choice and sampled-token logprobs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pagoda.sampling.greedy import greedy_tokens
from pagoda.sampling.logprobs import LogprobsTensors, gather_logprobs
from pagoda.sampling.metadata import LogitBias, Penalties, SamplingMetadata, TokenMask

_NEG_INF = float("-inf")


@dataclass(slots=True)
class SamplerOutput:
    """One sampled token per row and, when any row asked for them, their logprobs."""

    sampled_token_ids: Tensor  # [B] int64
    logprobs: LogprobsTensors | None = None  # of the raw (unprocessed) logits


class Sampler:
    """Turns a step's logits into next tokens, in vLLM V1's order of operations."""

    def __call__(self, logits: Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """Sample one token per row of `logits` [B, V]; `logits` itself is left unchanged."""
        num_logprobs = meta.max_num_logprobs
        if num_logprobs is None and meta.all_greedy and not _processes(meta):
            return SamplerOutput(greedy_tokens(logits))  # in the logits' own type
        logits = logits.float()
        if num_logprobs is None:
            return SamplerOutput(_sample(process_logits(logits, meta), meta))
        raw_logprobs = logits.log_softmax(-1)
        sampled = _sample(process_logits(logits, meta), meta)
        return SamplerOutput(sampled, gather_logprobs(raw_logprobs, num_logprobs, sampled))


def process_logits(logits: Tensor, meta: SamplingMetadata) -> Tensor:
    """Logit bias, min_tokens masking and penalties: the stages greedy and random rows share."""
    if meta.logit_bias is not None:
        logits = apply_logit_bias(logits, meta.logit_bias)
    if meta.stop_mask is not None:
        logits = apply_token_mask(logits, meta.stop_mask)
    if meta.penalties is not None:
        logits = apply_penalties(logits, meta.penalties)
    return logits


def _processes(meta: SamplingMetadata) -> bool:
    """Whether process_logits changes any logit."""
    return (meta.logit_bias is not None or meta.stop_mask is not None
            or meta.penalties is not None)


def warp_logits(logits: Tensor, meta: SamplingMetadata) -> Tensor:
    """Temperature, then min_p, top_k and top_p: the stages only random rows go through."""
    if meta.temperature is not None:
        logits = logits / meta.temperature.unsqueeze(-1)
    if meta.min_p is not None:
        logits = apply_min_p(logits, meta.min_p)
    if meta.top_k is not None:
        logits = apply_top_k(logits, meta.top_k, meta.max_top_k)
    if meta.top_p is not None:
        logits = apply_top_p(logits, meta.top_p)
    return logits


def apply_logit_bias(logits: Tensor, bias: LogitBias) -> Tensor:
    """Add each (row, token) bias."""
    return logits.index_put((bias.rows, bias.tokens), bias.values, accumulate=True)


def apply_token_mask(logits: Tensor, mask: TokenMask) -> Tensor:
    """Force each masked (row, token) logit to -inf."""
    return logits.index_put((mask.rows, mask.tokens), logits.new_full((), _NEG_INF))


def apply_penalties(logits: Tensor, p: Penalties) -> Tensor:
    """Repetition (prompt or output tokens), then frequency and presence (output tokens)."""
    in_output = p.output_counts > 0
    seen = in_output if p.prompt_mask is None else in_output | p.prompt_mask
    repetition = torch.where(seen, p.repetition.unsqueeze(-1), 1.0)
    logits = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = logits - p.frequency.unsqueeze(-1) * p.output_counts
    return logits - p.presence.unsqueeze(-1) * in_output


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Drop tokens with prob < min_p * max_prob, compared in log space (min_p = 0 keeps all)."""
    threshold = logits.amax(-1, keepdim=True) + min_p.log().unsqueeze(-1)
    return logits.masked_fill(logits < threshold, _NEG_INF)


def apply_top_k(logits: Tensor, top_k: Tensor, max_top_k: int) -> Tensor:
    """Keep each row's k best tokens (and any tied with the k-th); k = 0 keeps all."""
    best = logits.topk(max_top_k, dim=-1).values
    kth = best.gather(-1, (top_k.clamp(min=1) - 1).unsqueeze(-1))
    kth = kth.masked_fill((top_k == 0).unsqueeze(-1), _NEG_INF)
    return logits.masked_fill(logits < kth, _NEG_INF)


def apply_top_p(logits: Tensor, top_p: Tensor) -> Tensor:
    """Keep the smallest set of best tokens with total prob >= top_p (and ties with its last)."""
    ordered = logits.sort(dim=-1, descending=True).values
    cumulative = ordered.softmax(-1).cumsum(-1)
    # The last kept token is the first whose inclusive cumulative prob reaches top_p.
    last = (cumulative < top_p.unsqueeze(-1)).sum(-1, keepdim=True).clamp(max=logits.shape[-1] - 1)
    cutoff = ordered.gather(-1, last).masked_fill((top_p >= 1.0).unsqueeze(-1), _NEG_INF)
    return logits.masked_fill(logits < cutoff, _NEG_INF)


def _sample(logits: Tensor, meta: SamplingMetadata) -> Tensor:
    """Greedy rows take the argmax of the processed logits; random rows are drawn."""
    if meta.all_greedy:
        return greedy_tokens(logits)
    drawn = _sample_random(warp_logits(logits, meta), meta)
    if meta.greedy_mask is None:
        return drawn
    return torch.where(meta.greedy_mask, greedy_tokens(logits), drawn)


def _sample_random(logits: Tensor, meta: SamplingMetadata) -> Tensor:
    """Exponential race: argmax(probs / E) with E ~ Exp(1) is a draw from probs."""
    probs = logits.softmax(-1)
    return greedy_tokens(probs.div_(_exponential_noise(probs, meta.generators)))


def _exponential_noise(probs: Tensor, generators: dict[int, torch.Generator]) -> Tensor:
    """Exp(1) noise as -log U, U ~ Uniform[0, 1) (on CPU a fifth of exponential_'s time); a
    seeded row draws its own [V] from its generator, whatever the batch. U = 0 gives infinite
    noise, which only rules that token out; U < 1 keeps every draw above zero, so 0/0 never
    turns into NaN."""
    noise = torch.empty_like(probs)
    if len(generators) < probs.shape[0]:
        noise.uniform_()
    for row, generator in generators.items():
        noise[row].uniform_(generator=generator)
    return noise.log_().neg_()
