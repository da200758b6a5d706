"""Turns engine-core token outputs into RequestOutputs: detokenization, stop strings,
logprob formatting and fan-in of the `n` children of one request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagoda.core_outputs import EngineCoreOutput, LogprobsLists
from pagoda.engine.detokenizer import IncrementalDetokenizer, decode_token
from pagoda.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from pagoda.sampling_params import SamplingParams


@dataclass(slots=True)
class ChildState:
    """One of a request's `n` sequences as the frontend tracks it."""

    index: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    completion: CompletionOutput


@dataclass(slots=True)
class RequestState:
    """A user request: its prompt and its children, keyed by engine request id."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: dict[str, ChildState]
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    num_unfinished: int = 0  # children still generating (kept as a count: checked per step)

    def __post_init__(self) -> None:
        self.num_unfinished = len(self.children)

    @property
    def finished(self) -> bool:
        return self.num_unfinished == 0


class OutputProcessor:
    """Tracks every live user request; returns outputs and the ids to abort (stop strings)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self.child_to_parent: dict[str, str] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    children: list[tuple[str, SamplingParams]]) -> None:
        states = {}
        for index, (child_id, params) in enumerate(children):
            states[child_id] = self._child(index, params, prompt_token_ids)
            self.child_to_parent[child_id] = request_id
        want_prompt_lp = children[0][1].prompt_logprobs is not None
        self.requests[request_id] = RequestState(
            request_id, prompt, prompt_token_ids, states, [None] if want_prompt_lp else None)

    def _child(self, index: int, params: SamplingParams, prompt_ids: list[int]) -> ChildState:
        detok = None
        if params.detokenize and self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens,
                                           params.stop, params.include_stop_str_in_output)
        logprobs = [] if params.logprobs is not None else None
        cumulative = 0.0 if params.logprobs is not None else None
        return ChildState(index, params, detok,
                          CompletionOutput(index, logprobs=logprobs, cumulative_logprob=cumulative))

    def child_ids(self, request_id: str) -> list[str]:
        state = self.requests.get(request_id)
        return list(state.children) if state else []

    def process(self, outputs: list[EngineCoreOutput], final_only: bool = False
                ) -> tuple[list[RequestOutput], list[str]]:
        """Apply one step's outputs; returns updated requests (only finished ones with
        final_only, which spares copying every live request each step) and child ids to
        abort."""
        touched: dict[str, RequestState] = {}
        to_abort: list[str] = []
        for out in outputs:
            parent_id = self.child_to_parent.get(out.request_id)
            if parent_id is None:
                continue
            state = self.requests[parent_id]
            child = state.children[out.request_id]
            was_finished = child.completion.finished
            if self._apply(state, child, out):
                to_abort.append(out.request_id)
            state.num_unfinished -= child.completion.finished and not was_finished
            touched[parent_id] = state
        results = [self._snapshot(s) for s in touched.values() if s.finished or not final_only]
        for state in touched.values():
            if state.finished:
                self._forget(state)
        return results, to_abort

    def abort(self, request_id: str) -> RequestOutput | None:
        """Mark every unfinished child aborted; returns the final output."""
        state = self.requests.get(request_id)
        if state is None:
            return None
        for child in state.children.values():
            if not child.completion.finished:
                child.completion.finish_reason = "abort"
                state.num_unfinished -= 1
        result = self._snapshot(state)
        self._forget(state)
        return result

    def _apply(self, state: RequestState, child: ChildState, out: EngineCoreOutput) -> bool:
        """Returns True when a stop string ended the child (the core must abort it)."""
        completion = child.completion
        if out.new_prompt_logprobs is not None and state.prompt_logprobs is not None:
            state.prompt_logprobs.extend(self._logprob_dicts(out.new_prompt_logprobs))
        state.num_cached_tokens = out.num_cached_tokens
        if completion.finished:
            return False
        completion.token_ids.extend(out.new_token_ids)
        if out.new_logprobs is not None and completion.logprobs is not None:
            self._add_logprobs(completion, out.new_logprobs)
        stopped_by_string = False
        if child.detokenizer is not None and out.new_token_ids:
            matched = child.detokenizer.update(out.new_token_ids)
            if matched is not None:
                completion.finish_reason, completion.stop_reason = "stop", matched
                stopped_by_string = not out.finished
        if not stopped_by_string and out.finished:
            completion.finish_reason, completion.stop_reason = out.finish_reason, out.stop_reason
        self._release_text(child)
        return stopped_by_string

    def _release_text(self, child: ChildState) -> None:
        if child.detokenizer is None:
            return
        delta = child.detokenizer.get_delta(child.completion.finished)
        if delta:  # one copy of the text so far, not a join over every delta before
            child.completion.text += delta

    def _add_logprobs(self, completion: CompletionOutput, lists: LogprobsLists) -> None:
        positions = self._logprob_dicts(lists)
        assert completion.logprobs is not None and completion.cumulative_logprob is not None
        completion.logprobs.extend(positions)
        completion.cumulative_logprob += sum(values[0] for values in lists[1])

    def _logprob_dicts(self, lists: LogprobsLists) -> list[PositionLogprobs]:
        result = []
        for ids, values, rank in zip(*lists):
            position: PositionLogprobs = {}
            for k, (token_id, value) in enumerate(zip(ids, values)):
                if token_id in position:
                    continue
                text = decode_token(self.tokenizer, token_id) if self.tokenizer else None
                position[token_id] = Logprob(value, rank if k == 0 else k, text)
            result.append(position)
        return result

    def _snapshot(self, state: RequestState) -> RequestOutput:
        outputs = [_copy_completion(c.completion) for c in state.children.values()]
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, outputs,
                             state.finished,
                             list(state.prompt_logprobs) if state.prompt_logprobs else None,
                             state.num_cached_tokens)

    def _forget(self, state: RequestState) -> None:
        self.requests.pop(state.request_id, None)
        for child_id in state.children:
            self.child_to_parent.pop(child_id, None)


def _copy_completion(c: CompletionOutput) -> CompletionOutput:
    return CompletionOutput(c.index, c.text, list(c.token_ids), c.cumulative_logprob,
                            list(c.logprobs) if c.logprobs is not None else None,
                            c.finish_reason, c.stop_reason)
