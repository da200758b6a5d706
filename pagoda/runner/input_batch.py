"""The runner's persistent per-request state, updated from each step's scheduler diff."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pagoda.layers.attention.metadata import CommonAttentionMetadata
from pagoda.scheduler.output import NewRequestData, SchedulerOutput
from pagoda.sampling_params import SamplingParams


@dataclass(slots=True)
class CachedRequestState:
    """Everything the runner keeps about one request between steps."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None
    block_ids: list[int]
    num_computed_tokens: int
    generator: torch.Generator | None
    output_token_ids: list[int] = field(default_factory=list)
    num_prompt_logprobs_done: int = 0  # prompt positions already reported (survives preemption)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        prompt = self.prompt_token_ids
        if end <= len(prompt):
            return prompt[start:end]
        out_start = max(start - len(prompt), 0)
        head = prompt[start:] if start < len(prompt) else []
        return head + self.output_token_ids[out_start:end - len(prompt)]


@dataclass(slots=True)
class StepBatch:
    """The flat tensors of one step, plus which rows sample and which want prompt logprobs."""

    request_ids: list[str]
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: CommonAttentionMetadata
    sample_rows: list[int]  # batch rows whose last scheduled token ends the known sequence
    logits_indices: torch.Tensor  # flat token index of each sampling row's last token


class InputBatch:
    """Holds request states and turns a SchedulerOutput into a StepBatch."""

    def __init__(self, device: torch.device, block_size: int) -> None:
        self.device = device
        self.block_size = block_size
        self.requests: dict[str, CachedRequestState] = {}
        self._num_prompt_logprobs = 0  # live requests that asked for prompt logprobs
        self._staging: torch.Tensor | None = None  # reused host buffer for uploads
        self._uploaded: torch.cuda.Event | None = None  # marks the last upload's completion

    @property
    def num_prompt_logprob_requests(self) -> int:
        return self._num_prompt_logprobs

    def update(self, out: SchedulerOutput) -> None:
        for request_id in out.finished_request_ids:
            state = self.requests.pop(request_id, None)
            if state is not None and state.sampling_params.prompt_logprobs is not None:
                self._num_prompt_logprobs -= 1
        for new in out.new_requests:
            self.requests[new.request_id] = self._new_state(new)
            self._num_prompt_logprobs += new.sampling_params.prompt_logprobs is not None
        for cached in out.cached_requests:
            state = self.requests[cached.request_id]
            if cached.resumed_from_preemption:
                state.block_ids = list(cached.new_block_ids)
            else:
                state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def _new_state(self, new: NewRequestData) -> CachedRequestState:
        seed = new.sampling_params.seed
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed % (1 << 64))
        return CachedRequestState(new.request_id, list(new.prompt_token_ids), new.sampling_params,
                                  new.eos_token_id, list(new.block_ids),
                                  new.num_computed_tokens, generator)

    def prepare(self, out: SchedulerOutput) -> StepBatch:
        request_ids = list(out.num_scheduled_tokens)
        counts = [out.num_scheduled_tokens[r] for r in request_ids]
        states = [self.requests[r] for r in request_ids]
        starts = [s.num_computed_tokens for s in states]
        input_ids = np.fromiter((t for s, a, n in zip(states, starts, counts)
                                 for t in s.tokens(a, a + n)), dtype=np.int64)
        positions = np.concatenate([np.arange(a, a + n) for a, n in zip(starts, counts)])
        seq_lens = [a + n for a, n in zip(starts, counts)]
        query_start = np.zeros(len(states) + 1, dtype=np.int64)
        np.cumsum(counts, out=query_start[1:])
        tables = self._block_tables(states)
        token_rows = np.repeat(np.arange(len(states)), counts)
        slots = tables[token_rows, positions // self.block_size] * self.block_size \
            + positions % self.block_size
        sample_rows = [i for i, s in enumerate(states) if seq_lens[i] == s.num_tokens]
        logits_indices = query_start[1:][sample_rows] - 1
        dev = self._upload([input_ids, positions, slots, query_start, np.asarray(seq_lens),
                            tables.ravel(), logits_indices])
        i32 = torch.int32
        attn = CommonAttentionMetadata(
            num_tokens=int(query_start[-1]), num_seqs=len(states), max_query_len=max(counts),
            max_seq_len=max(seq_lens), query_start_loc=dev[3].to(i32), seq_lens=dev[4].to(i32),
            block_tables=dev[5].view(tables.shape).to(i32), slot_mapping=dev[2],
            query_start_loc_cpu=query_start.tolist(), seq_lens_cpu=seq_lens,
            block_size=self.block_size)
        return StepBatch(request_ids, dev[0], dev[1], attn, sample_rows, dev[6])

    def _block_tables(self, states: list[CachedRequestState]) -> np.ndarray:
        width = max(len(s.block_ids) for s in states)
        tables = np.zeros((len(states), width), dtype=np.int64)
        for i, s in enumerate(states):
            tables[i, :len(s.block_ids)] = s.block_ids
        return tables

    def _upload(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """All of a step's index arrays in one host->device copy (through a reused pinned
        buffer on CUDA); returns one int64 device view per array."""
        sizes = [a.size for a in arrays]
        total = sum(sizes)
        if self._staging is None or self._staging.numel() < total:
            self._staging = torch.empty(max(total, 2 * (0 if self._staging is None else
                                                        self._staging.numel())),
                                        dtype=torch.int64,
                                        pin_memory=self.device.type == "cuda")
        if self._uploaded is not None:
            self._uploaded.synchronize()  # the last step's copy has left the buffer
        staging = self._staging[:total]
        np.concatenate([a.astype(np.int64, copy=False).ravel() for a in arrays],
                       out=staging.numpy())
        if self.device.type == "cpu":
            return list(staging.clone().split(sizes))
        flat = staging.to(self.device, non_blocking=True)
        self._uploaded = torch.cuda.Event()
        self._uploaded.record()
        return list(flat.split(sizes))
