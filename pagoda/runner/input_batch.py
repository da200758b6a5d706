"""The runner's persistent per-request state, updated from each step's scheduler diff."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from pagoda.layers.attention.metadata import CommonAttentionMetadata, StepKVGroups
from pagoda.sampling_params import SamplingParams
from pagoda.scheduler.output import NewRequestData, SchedulerOutput


@dataclass(slots=True)
class CachedRequestState:
    """Everything the runner keeps about one request between steps."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None
    block_ids: list[list[int]]  # one block table per KV group
    num_computed_tokens: int
    generator: torch.Generator | None
    lora_id: int = 0  # its LoRA adapter (0: the base model)
    output_token_ids: list[int] = field(default_factory=list)
    num_prompt_logprobs_done: int = 0  # prompt positions already reported (survives preemption)
    # the newest token is still on the device: its row in the sampled ids of step pending_step
    pending_row: int = -1
    pending_step: int = -1

    @property
    def num_tokens(self) -> int:
        """Tokens known on the host (the pending one, if any, not counted)."""
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
    attn: CommonAttentionMetadata  # KV group 0's (every group's but the tables and slots)
    sample_rows: list[int]  # batch rows whose last scheduled token ends the sequence
    logits_indices: torch.Tensor  # flat token index of each sampling row's last token
    kv_groups: StepKVGroups  # every KV group's metadata, attn first


class InputBatch:
    """Holds request states and turns a SchedulerOutput into a StepBatch."""

    def __init__(self, device: torch.device, block_size: int) -> None:
        self.device = device
        self.block_size = block_size
        self.requests: dict[str, CachedRequestState] = {}
        self._num_prompt_logprobs = 0  # live requests that asked for prompt logprobs
        # two reused host buffers for uploads, used in turn, and their last copies' events
        self._staging: list[torch.Tensor | None] = [None, None]
        self._uploaded: list[torch.cuda.Event | None] = [None, None]
        self._slot = 0

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
                state.block_ids = [list(ids) for ids in cached.new_block_ids]
            elif cached.new_block_ids:  # empty on most decode steps
                for table, new_ids in zip(state.block_ids, cached.new_block_ids):
                    table.extend(new_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def _new_state(self, new: NewRequestData) -> CachedRequestState:
        seed = new.sampling_params.seed
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed % (1 << 64))
        return CachedRequestState(new.request_id, list(new.prompt_token_ids), new.sampling_params,
                                  new.eos_token_id, [list(ids) for ids in new.block_ids],
                                  new.num_computed_tokens, generator, new.lora_id)

    def prepare(self, out: SchedulerOutput,
                last_sampled: torch.Tensor | None = None) -> StepBatch:
        """The step's tensors. A request whose newest token is still on the device (sampled
        by the previous step, whose ids are `last_sampled`) gets it copied in there."""
        request_ids = list(out.num_scheduled_tokens)
        counts = [out.num_scheduled_tokens[r] for r in request_ids]
        states = [self.requests[r] for r in request_ids]
        starts = [s.num_computed_tokens for s in states]
        query_start = np.zeros(len(states) + 1, dtype=np.int64)
        np.cumsum(counts, out=query_start[1:])
        input_ids, fill_at, fill_from = self._input_ids(states, starts, counts, query_start)
        # token i of row r sits at starts[r] + (i - query_start[r])
        positions = np.arange(query_start[-1]) + np.repeat(
            np.asarray(starts, dtype=np.int64) - query_start[:-1], counts)
        seq_lens = [a + n for a, n in zip(starts, counts)]
        tables = self._block_tables(states)
        token_rows = np.repeat(np.arange(len(states)), counts)
        slots = self._slot_mapping(tables, token_rows, positions)
        sample_rows = [i for i, s in enumerate(states)
                       if seq_lens[i] == s.num_tokens + (s.pending_row >= 0)]
        logits_indices = query_start[1:][sample_rows] - 1
        dev = self._upload([input_ids, positions, slots, query_start, np.asarray(seq_lens),
                            tables.ravel(), logits_indices, np.asarray(fill_at, np.int64),
                            np.asarray(fill_from, np.int64)])
        if fill_at:  # pending tokens: straight from the previous step's sampled ids
            input_ids_dev, fill_at_dev, fill_from_dev = dev[0], dev[7], dev[8]
            input_ids_dev[fill_at_dev] = last_sampled[fill_from_dev]
        i32 = torch.int32
        attn = CommonAttentionMetadata(
            num_tokens=int(query_start[-1]), num_seqs=len(states), max_query_len=max(counts),
            max_seq_len=max(seq_lens), query_start_loc=dev[3].to(i32), seq_lens=dev[4].to(i32),
            block_tables=dev[5].view(tables.shape).to(i32), slot_mapping=dev[2],
            query_start_loc_cpu=query_start.tolist(), seq_lens_cpu=seq_lens,
            block_size=self.block_size)
        kv_groups = self._kv_groups(attn)
        return StepBatch(request_ids, dev[0], dev[1], kv_groups.metadata[0], sample_rows, dev[6],
                         kv_groups)

    @staticmethod
    def _input_ids(states: list[CachedRequestState], starts: list[int], counts: list[int],
                   query_start: np.ndarray) -> tuple[np.ndarray, list[int], list[int]]:
        """The scheduled tokens, flat; a pending token is a 0 placeholder, listed in
        fill_at (its flat index) and fill_from (its row in the previous step's ids)."""
        ids: list[int] = []
        fill_at, fill_from = [], []
        for row, (state, start, count) in enumerate(zip(states, starts, counts)):
            end = start + count
            known = state.num_tokens
            if end <= known:
                ids += state.tokens(start, end)
                continue
            if end != known + 1 or state.pending_row < 0:
                raise RuntimeError(f"request {state.request_id} scheduled past its known "
                                   "tokens with no pending token")
            ids += state.tokens(start, known)
            ids.append(0)
            fill_at.append(int(query_start[row + 1]) - 1)
            fill_from.append(state.pending_row)
        return np.asarray(ids, dtype=np.int64), fill_at, fill_from

    def _block_tables(self, states: list[CachedRequestState]) -> np.ndarray:
        """[rows, longest table] block ids, zero-padded, filled in one masked assignment."""
        lens = np.fromiter((len(s.block_ids[0]) for s in states), dtype=np.int64,
                           count=len(states))
        flat = np.fromiter(itertools.chain.from_iterable(s.block_ids[0] for s in states),
                           dtype=np.int64, count=int(lens.sum()))
        tables = np.zeros((len(states), int(lens.max())), dtype=np.int64)
        tables[np.arange(tables.shape[1]) < lens[:, None]] = flat
        return tables

    def _slot_mapping(self, tables: np.ndarray, token_rows: np.ndarray,
                      positions: np.ndarray) -> np.ndarray:
        """The KV slot each scheduled token is written to."""
        return tables[token_rows, positions // self.block_size] * self.block_size \
            + positions % self.block_size

    @staticmethod
    def _kv_groups(attn: CommonAttentionMetadata) -> StepKVGroups:
        """One KV group: its tables and slots stand for the stacked ones (a copy into a
        [1, ...] buffer broadcasts them)."""
        return StepKVGroups((attn,), attn.block_tables, attn.slot_mapping)

    def _upload(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """All of a step's index arrays in one host->device copy (through one of two reused
        pinned buffers on CUDA, so preparing a step never waits on the previous step's
        copy); returns one int64 device view per array."""
        sizes = [a.size for a in arrays]
        total = sum(sizes)
        self._slot ^= 1
        staging = self._staging[self._slot]
        if staging is None or staging.numel() < total:
            size = max(total, 2 * (0 if staging is None else staging.numel()))
            staging = torch.empty(size, dtype=torch.int64, pin_memory=self.device.type == "cuda")
            self._staging[self._slot] = staging
        elif self._uploaded[self._slot] is not None:
            self._uploaded[self._slot].synchronize()  # its last copy has left the buffer
        staging = staging[:total]
        np.concatenate([a.astype(np.int64, copy=False).ravel() for a in arrays],
                       out=staging.numpy())
        if self.device.type == "cpu":
            return list(staging.clone().split(sizes))
        flat = staging.to(self.device, non_blocking=True)
        self._uploaded[self._slot] = torch.cuda.Event()
        self._uploaded[self._slot].record()
        return list(flat.split(sizes))


class GroupedInputBatch(InputBatch):
    """An InputBatch for a model of several KV groups: a block table and slot mapping per
    group (a request's tables are equally long in every group), uploaded stacked."""

    def __init__(self, device: torch.device, block_size: int, num_kv_groups: int) -> None:
        super().__init__(device, block_size)
        self.num_kv_groups = num_kv_groups

    def _block_tables(self, states: list[CachedRequestState]) -> np.ndarray:
        """[groups, rows, longest table] block ids, zero-padded."""
        lens = np.fromiter((len(s.block_ids[0]) for s in states), dtype=np.int64,
                           count=len(states))
        tables = np.zeros((self.num_kv_groups, len(states), int(lens.max())), dtype=np.int64)
        filled, count = np.arange(tables.shape[2]) < lens[:, None], int(lens.sum())
        for g, table in enumerate(tables):
            table[filled] = np.fromiter(
                itertools.chain.from_iterable(s.block_ids[g] for s in states),
                dtype=np.int64, count=count)
        return tables

    def _slot_mapping(self, tables: np.ndarray, token_rows: np.ndarray,
                      positions: np.ndarray) -> np.ndarray:
        """[groups, tokens]: each group's slot of every scheduled token."""
        return tables[:, token_rows, positions // self.block_size] * self.block_size \
            + positions % self.block_size

    def _kv_groups(self, attn: CommonAttentionMetadata) -> StepKVGroups:
        """Split the step's stacked tables and slots into one metadata per group."""
        slot_mapping = attn.slot_mapping.view(self.num_kv_groups, -1)
        return StepKVGroups(tuple(replace(attn, block_tables=tables, slot_mapping=slots)
                                  for tables, slots in zip(attn.block_tables, slot_mapping)),
                            attn.block_tables, slot_mapping)


def make_input_batch(device: torch.device, block_size: int, num_kv_groups: int) -> InputBatch:
    """The batch for a model of num_kv_groups KV groups."""
    if num_kv_groups == 1:
        return InputBatch(device, block_size)
    return GroupedInputBatch(device, block_size, num_kv_groups)
