"""ModelRunner: turns a SchedulerOutput into one forward pass and sampled tokens.

A step is three calls: launch() queues the forward pass and the logits, sample_tokens()
queues the sampling (with the grammar bitmask the caller filled on the host meanwhile), and
finish() waits for the sampled tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pagoda.core_outputs import LogprobsLists
from pagoda.kv_cache.block_pool import NULL_BLOCK_ID
from pagoda.kv_cache.groups import group_layers
from pagoda.layers.attention.backend import AttentionBackend
from pagoda.lora.manager import LoRAManager
from pagoda.runner.cpu_plans import CpuPlanRunner
from pagoda.runner.cuda_graphs import CudaGraphRunner
from pagoda.runner.input_batch import CachedRequestState, StepBatch, make_input_batch
from pagoda.runner.memory import KVCacheSpec
from pagoda.runner.sleep import KVArena, WeightSleeper, address_fingerprint
from pagoda.sampling.logprobs import LogprobsTensors, compute_prompt_logprobs
from pagoda.sampling.metadata import SamplingMetadata, SamplingRow
from pagoda.sampling.sampler import Sampler
from pagoda.sampling_params import SamplingParams
from pagoda.scheduler.output import ModelRunnerOutput, NewRequestData, SchedulerOutput
from pagoda.structured_output.bitmask import apply_bitmask


@dataclass(slots=True)
class LaunchedStep:
    """A step queued on the device: who samples, and the host copies on their way."""

    step_id: int
    output: ModelRunnerOutput = field(default_factory=ModelRunnerOutput)
    # from launch() until sample_tokens(): the batch, its sampling rows' logits, and which
    # requests' rows a grammar constrains (request id -> row of the grammar bitmask)
    step_batch: StepBatch | None = None
    logits: torch.Tensor | None = None
    grammar_rows: dict[str, int] = field(default_factory=dict)
    states: list[CachedRequestState] = field(default_factory=list)  # in sampled-row order
    sampled_host: torch.Tensor | None = None
    logprobs_host: LogprobsTensors | None = None
    copied: torch.cuda.Event | None = None  # the host copies are complete (CUDA)
    # a pipeline stage: the sampled ids' sends or receive, and where they land
    transfers: list = field(default_factory=list)
    sampled_device: torch.Tensor | None = None


@dataclass(slots=True)
class RunnerConfig:
    """What the runner needs to know about the engine it serves."""

    device: torch.device
    dtype: torch.dtype
    block_size: int
    vocab_size: int
    kv_dtype: torch.dtype | None = None  # the KV cache's element type (None: dtype)


class ModelRunner:
    """Owns the model, the KV cache tensor, the per-request batch state and the sampler."""

    def __init__(self, model: nn.Module, config: RunnerConfig, backend: AttentionBackend,
                 lora: LoRAManager | None = None) -> None:
        self.model = model
        self.lora = lora  # the adapters' slots and each step's per-token slot index
        self.config = config
        self.backend = backend
        self.kv_layout = group_layers(model.kv_cache_spec())
        self.batch = make_input_batch(config.device, config.block_size,
                                      len(self.kv_layout.groups))
        self.sampler = Sampler()
        self.kv_cache: torch.Tensor | None = None
        self.num_kv_blocks = 0
        self.graphs: CudaGraphRunner | CpuPlanRunner | None = None
        self._graph_shape: tuple[int, int] | None = None  # (max_num_seqs, max_model_len)
        self._graph_addresses: tuple | None = None  # what the captured graphs point at
        self.weight_sleeper = WeightSleeper(model, config.device)
        self.kv_arena = KVArena(config.device)
        self.asleep = False
        self._sampling_key: list[str] | None = None  # the rows _sampling_meta was built for
        self._sampling_meta: SamplingMetadata | None = None
        self._step_id = 0
        self._last_sampled: torch.Tensor | None = None  # the latest step's ids, on the device

    def capture_cuda_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """Capture decode steps (needs a CUDA device and a graph-safe backend)."""
        hidden = self.model.config.hidden_size
        self.graphs = None  # an earlier capture's memory pool goes before the new one's
        if self.lora is not None:
            self.lora.state.active = True  # the graphs must hold the adapter kernels
        self.graphs = CudaGraphRunner(self.model, self.backend, self.config.block_size,
                                      max_num_seqs, max_model_len, hidden, self.config.dtype,
                                      self.config.device, len(self.kv_layout.groups),
                                      self.model.stage)
        self.graphs.capture()
        self._graph_shape = (max_num_seqs, max_model_len)
        self._graph_addresses = self._addresses()

    def capture_cpu_plans(self, max_num_seqs: int, max_model_len: int) -> bool:
        """Note decode steps as plans of CPU kernel calls; False where the model computes
        outside the kernels (then every step runs eagerly)."""
        self.graphs = None  # earlier plans point at memory that may have moved
        plans = CpuPlanRunner(self.model, self.config.block_size, max_num_seqs, max_model_len,
                              len(self.kv_layout.groups))
        if not plans.capture(self.kv_cache.dtype):
            return False
        self.graphs = plans
        self._graph_shape = (max_num_seqs, max_model_len)
        self._graph_addresses = self._addresses()
        return True

    def _addresses(self) -> tuple:
        return address_fingerprint(self.weight_sleeper.tensors, self.kv_cache)

    def sleep(self) -> None:
        """Give the weights' and KV cache's device memory back (the KV contents are lost;
        weights go to host memory). Only while no request is running."""
        if self.asleep:
            return
        self.release_kv_cache()
        self.kv_arena.release()
        self.weight_sleeper.sleep()
        self.asleep = True

    def wake_up(self) -> bool:
        """Undo sleep(); re-captures the CUDA graphs only if an address they use moved.
        Returns whether it re-captured."""
        if not self.asleep:
            return False
        self.weight_sleeper.wake()
        self.initialize_kv_cache(self.num_kv_blocks, allocate=self.kv_arena.allocate)
        self.asleep = False
        if self.graphs is None or self._addresses() == self._graph_addresses:
            return False
        if isinstance(self.graphs, CpuPlanRunner):
            self.capture_cpu_plans(*self._graph_shape)
        else:
            self.capture_cuda_graphs(*self._graph_shape)
        return True

    def kv_cache_spec(self) -> KVCacheSpec:
        layout = self.kv_layout
        return KVCacheSpec(layout.slots, self.config.block_size, layout.num_kv_heads,
                           layout.head_dim, self.config.kv_dtype or self.config.dtype,
                           layout.windows)

    def initialize_kv_cache(self, num_blocks: int, allocate=None) -> None:
        """Allocate one KV tensor (with `allocate(shape, dtype)` if given), one slab per layer
        slot of a block, and bind each attention layer to its KV group and slot's slab."""
        spec = self.kv_cache_spec()
        shape = (spec.num_layers, 2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        if allocate is None:
            self.kv_cache = torch.empty(shape, dtype=spec.dtype, device=self.config.device)
        else:
            self.kv_cache = allocate(shape, spec.dtype)
        self.num_kv_blocks = num_blocks
        self.kv_cache[:, :, NULL_BLOCK_ID].zero_()  # padding reads land here
        places = self.kv_layout.places()
        for i, layer in enumerate(self.model.attention_layers()):
            layer.kv_group, slot = places[i]
            layer.kv_cache = self.kv_cache[slot]
            layer.backend = self.backend

    @torch.inference_mode()
    def profile_peak_memory(self, num_tokens: int, num_seqs: int, max_model_len: int) -> int:
        """Peak device bytes of one step at the full token budget: a forward over num_tokens
        prompt tokens (as sequences of at most max_model_len) plus logits and sampling for
        num_seqs rows. Runs on a temporary KV cache just big enough."""
        lens = [min(max_model_len, num_tokens - start)
                for start in range(0, num_tokens, max_model_len)]
        bs = self.config.block_size
        self.initialize_kv_cache(sum(-(-n // bs) for n in lens) + 1)
        groups = len(self.kv_layout.groups)
        sched_out = _prefill_schedule(lens, bs, self.config.vocab_size, groups)
        batch = make_input_batch(self.config.device, bs, groups)
        batch.update(sched_out)
        step = batch.prepare(sched_out)
        torch.cuda.reset_peak_memory_stats(self.config.device)
        stage, hidden_size = self.model.stage, self.model.config.hidden_size
        intermediate = None if stage.is_first else tuple(
            torch.zeros(step.input_ids.shape[0], hidden_size, dtype=self.config.dtype,
                        device=self.config.device) for _ in range(2))
        hidden = self.model(step.input_ids, step.positions,
                            self.backend.build_group_metadata(step.kv_groups.metadata),
                            *(() if intermediate is None else (intermediate,)))
        if not stage.is_last:  # no logits here: the activations are the peak
            torch.cuda.synchronize(self.config.device)
            peak = torch.cuda.max_memory_allocated(self.config.device)
            self.release_kv_cache()
            return peak
        rows = hidden[torch.arange(num_seqs, device=hidden.device) % hidden.shape[0]]
        logits = self.model.compute_logits(rows)
        meta = SamplingMetadata.build(
            [SamplingRow(SamplingParams(temperature=1.0, top_p=0.9, top_k=50), [0], [], None,
                         None)] * num_seqs, self.config.vocab_size, self.config.device)
        self.sampler(logits, meta)
        torch.cuda.synchronize(self.config.device)
        peak = torch.cuda.max_memory_allocated(self.config.device)
        self.release_kv_cache()
        return peak

    def release_kv_cache(self) -> None:
        for layer in self.model.attention_layers():
            layer.kv_cache = None
        self.kv_cache = None
        if self.config.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def launch(self, sched_out: SchedulerOutput) -> LaunchedStep:
        """Queue one step's forward pass and logits on the device and return without waiting
        for them (except for prompt logprobs). Call sample_tokens() on it before launching
        the next step, and finish() before launching a step that reads its tokens as pending
        ones (the next but one with async scheduling; a pipeline's steps never do, as no
        request is scheduled again before its token is back)."""
        self.batch.update(sched_out)
        self._step_id += 1
        launched = LaunchedStep(self._step_id)
        if self.lora is not None:
            self.lora.retire(s.lora_id for s in self.batch.requests.values())
        if sched_out.is_empty:
            return launched
        step = self.batch.prepare(sched_out, self._last_sampled)
        if self.lora is not None:
            self._set_lora_step(step)
        hidden = self._forward(step)  # None on a pipeline stage before the last
        if hidden is not None:
            self._prompt_logprobs(step, hidden, launched.output)
        if step.sample_rows:
            launched.step_batch, launched.grammar_rows = step, sched_out.grammar_rows
            if hidden is not None:
                launched.logits = self.model.compute_logits(hidden[step.logits_indices])
        return launched

    @torch.inference_mode()
    def sample_tokens(self, launched: LaunchedStep,
                      grammar_bitmask: torch.Tensor | None = None) -> None:
        """Queue the sampling of the step launched last (the next launch reads its tokens).
        grammar_bitmask: int32 [rows, ceil(vocab/32)] (bit set = allowed), the rows the
        step's grammar_rows name; required when it has any."""
        if launched.step_batch is None:
            return  # nothing samples this step
        if launched.grammar_rows and grammar_bitmask is None and launched.logits is not None:
            raise ValueError("this step samples constrained requests: pass their bitmask")
        self._sample(launched, grammar_bitmask)
        launched.step_batch = launched.logits = None

    def finish(self, launched: LaunchedStep) -> ModelRunnerOutput:
        """Wait for a launched step's sampled tokens and hand them to the requests."""
        out = launched.output
        if not launched.states:
            return out
        for transfer in launched.transfers:
            transfer.wait()
        if launched.copied is not None:
            launched.copied.synchronize()
        if launched.sampled_host is None:
            launched.sampled_host = launched.sampled_device.cpu()
        sampled = launched.sampled_host.tolist()
        lp = launched.logprobs_host
        for row, (state, token_id) in enumerate(zip(launched.states, sampled)):
            state.output_token_ids.append(token_id)
            if state.pending_step == launched.step_id:
                state.pending_row = state.pending_step = -1
            out.sampled_token_ids[state.request_id] = [token_id]
            if lp is not None and state.sampling_params.logprobs is not None:
                out.logprobs[state.request_id] = _rows_to_lists(
                    lp, [row], state.sampling_params.logprobs)
        return out

    def remove_lora(self, lora_id: int) -> None:
        """Forget an adapter once no request of the batch uses it."""
        self.lora.remove(lora_id, (s.lora_id for s in self.batch.requests.values()))

    def _set_lora_step(self, step: StepBatch) -> None:
        qsl = step.attn.query_start_loc_cpu
        self.lora.set_step([self.batch.requests[r].lora_id for r in step.request_ids],
                           [qsl[i + 1] - qsl[i] for i in range(len(step.request_ids))])

    def _forward(self, step: StepBatch) -> torch.Tensor | None:
        """The step's hidden states; on a pipeline stage, the previous stage's activations
        come in first, and a stage before the last sends its own on and returns None."""
        stage = self.model.stage
        intermediate = None
        if not stage.is_first:
            shape = (step.input_ids.shape[0], self.model.config.hidden_size)
            intermediate = stage.receive(shape, self.config.dtype, self.config.device, 2)
        if self.graphs is not None and self.graphs.can_run(step.attn):  # LoRA always in
            out = self.graphs.run(step.input_ids, step.positions, step.kv_groups, intermediate)
        else:
            metadata = self.backend.build_group_metadata(step.kv_groups.metadata)
            out = self.model(step.input_ids, step.positions, metadata,
                             *(() if intermediate is None else (intermediate,)))
        if stage.is_last:
            return out
        stage.send(out)  # its transfer is ordered before the stream's later work
        return None

    def _sample(self, launched: LaunchedStep, grammar_bitmask: torch.Tensor | None) -> None:
        """Queue the sampling; the sampled ids stay on the device for the next step's
        pending tokens and are copied to the host in the background."""
        step, logits = launched.step_batch, launched.logits
        states = [self.batch.requests[step.request_ids[i]] for i in step.sample_rows]
        result = None
        if logits is not None:
            if grammar_bitmask is not None:
                self._apply_grammars(logits, states, launched.grammar_rows, grammar_bitmask)
            result = self.sampler(logits, self._sampling_metadata(states))
            sampled = result.sampled_token_ids
        else:  # a pipeline stage before the last: the last stage's tokens arrive here
            sampled = torch.empty(len(states), dtype=torch.int64, device=self.config.device)
        launched.transfers = self.model.stage.share_sampled(sampled)
        for row, state in enumerate(states):
            state.pending_row, state.pending_step = row, launched.step_id
        self._last_sampled = sampled
        launched.states = states
        if launched.transfers:  # a pipeline: the ids are read once they are here (finish)
            launched.sampled_device = sampled
        else:
            launched.sampled_host = _to_host(sampled)
        if result is not None and result.logprobs is not None:
            lp = result.logprobs
            launched.logprobs_host = LogprobsTensors(_to_host(lp.token_ids),
                                                     _to_host(lp.logprobs), _to_host(lp.ranks))
        if self.config.device.type == "cuda":
            launched.copied = torch.cuda.Event()
            launched.copied.record()

    def _sampling_metadata(self, states: list[CachedRequestState]) -> SamplingMetadata:
        """The batch's sampling tensors. Reused while the same requests sample in the same
        order (every decode step between arrivals and departures) unless a row's tensors
        change with its output (penalties, a pending min_tokens)."""
        key = [s.request_id for s in states]
        if key == self._sampling_key:
            return self._sampling_meta
        meta = SamplingMetadata.build([_sampling_row(s) for s in states],
                                      self.config.vocab_size, self.config.device)
        steady = not any(s.sampling_params.sampling_reads_output for s in states)
        self._sampling_key, self._sampling_meta = (key if steady else None), meta
        return meta

    def _apply_grammars(self, logits: torch.Tensor, states: list[CachedRequestState],
                        grammar_rows: dict[str, int], grammar_bitmask: torch.Tensor) -> None:
        """Mask the logits rows of constrained requests to the tokens their grammar allows."""
        rows, mask_rows = [], []
        for row, state in enumerate(states):
            mask_row = grammar_rows.get(state.request_id)
            if mask_row is not None:
                rows.append(row)
                mask_rows.append(mask_row)
        if not rows:
            return
        bitmask = grammar_bitmask[mask_rows].to(self.config.device, non_blocking=True)
        apply_bitmask(logits, bitmask, rows)

    def _prompt_logprobs(self, step: StepBatch, hidden: torch.Tensor,
                         out: ModelRunnerOutput) -> None:
        """Logprobs of each prompt token given its prefix, for requests that asked."""
        if not self.batch.num_prompt_logprob_requests:
            return
        qsl = step.attn.query_start_loc_cpu
        for row, request_id in enumerate(step.request_ids):
            state = self.batch.requests[request_id]
            num_top = state.sampling_params.prompt_logprobs
            if num_top is None:
                continue
            start = max(step.attn.seq_lens_cpu[row] - (qsl[row + 1] - qsl[row]),
                        state.num_prompt_logprobs_done)
            # hidden state at position p scores prompt token p + 1
            end = min(step.attn.seq_lens_cpu[row], len(state.prompt_token_ids) - 1)
            if end <= start:
                continue
            first = qsl[row] + start - (step.attn.seq_lens_cpu[row] - (qsl[row + 1] - qsl[row]))
            targets = torch.tensor(state.prompt_token_ids[start + 1:end + 1],
                                   device=self.config.device)
            logits = self.model.compute_logits(hidden[first:first + end - start])
            lp = compute_prompt_logprobs(logits, targets, num_top)
            out.prompt_logprobs[request_id] = _rows_to_lists(lp, list(range(end - start)), num_top)
            state.num_prompt_logprobs_done = end

def _prefill_schedule(lens: list[int], block_size: int, vocab_size: int,
                      num_kv_groups: int) -> SchedulerOutput:
    """A step prefilling sequences of these lengths from scratch, on consecutive blocks (the
    same ones in every KV group: only the memory peak matters)."""
    sched_out, next_block = SchedulerOutput(), 1
    for i, n in enumerate(lens):
        blocks = list(range(next_block, next_block + -(-n // block_size)))
        next_block += len(blocks)
        sched_out.new_requests.append(NewRequestData(
            f"profile-{i}", [i % vocab_size] * n, SamplingParams(max_tokens=1), None,
            [blocks] * num_kv_groups, 0))
        sched_out.num_scheduled_tokens[f"profile-{i}"] = n
    return sched_out


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """Start copying to (pinned) host memory without waiting; CPU tensors pass through."""
    return tensor.to("cpu", non_blocking=True) if tensor.is_cuda else tensor


def _sampling_row(state: CachedRequestState) -> SamplingRow:
    return SamplingRow(state.sampling_params, state.prompt_token_ids, state.output_token_ids,
                       state.generator, state.eos_token_id)


def _rows_to_lists(lp: LogprobsTensors, rows: list[int], num_top: int) -> LogprobsLists:
    width = num_top + 1
    ids = lp.token_ids[rows, :width].tolist()
    values = lp.logprobs[rows, :width].tolist()
    ranks = lp.ranks[rows].tolist()
    return ids, values, ranks
