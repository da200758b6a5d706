"""Logprobs in OpenAI's two shapes: legacy completions (parallel lists) and chat
(per-token objects with bytes and top candidates)."""

from __future__ import annotations

from typing import Any

from pagoda.engine.detokenizer import decode_token
from pagoda.entrypoints.openai.protocol import (
    ChatChoiceLogProbs,
    ChatCompletionLogProb,
    CompletionLogProbs,
    TopLogprob,
)
from pagoda.outputs import CompletionOutput, PositionLogprobs, RequestOutput


def _text(tokenizer: Any, token_id: int, position: PositionLogprobs | None) -> str:
    entry = position.get(token_id) if position else None
    if entry is not None and entry.decoded_token is not None:
        return entry.decoded_token
    return decode_token(tokenizer, token_id) if tokenizer is not None else str(token_id)


def _top(tokenizer: Any, position: PositionLogprobs, num_top: int) -> list[tuple[str, float]]:
    ranked = sorted(position.items(), key=lambda kv: (kv[1].rank or 0, -kv[1].logprob))
    return [(_text(tokenizer, t, position), lp.logprob) for t, lp in ranked
            if lp.rank is not None and lp.rank <= num_top][:num_top]


def completion_logprobs(tokenizer: Any, out: RequestOutput, completion: CompletionOutput,
                        echo: bool, num_top: int, start: int = 0) -> CompletionLogProbs:
    """Logprobs of completion tokens [start:], preceded by the prompt's when echoing."""
    result = CompletionLogProbs()
    if echo and out.prompt_logprobs is not None:
        for token_id, position in zip(out.prompt_token_ids, out.prompt_logprobs):
            _append(result, tokenizer, token_id, position, num_top)
    positions = completion.logprobs or []
    for token_id, position in zip(completion.token_ids[start:], positions[start:]):
        _append(result, tokenizer, token_id, position, num_top)
    return result


def _append(result: CompletionLogProbs, tokenizer: Any, token_id: int,
            position: PositionLogprobs | None, num_top: int) -> None:
    text = _text(tokenizer, token_id, position)
    offset = result.text_offset[-1] + len(result.tokens[-1]) if result.tokens else 0
    result.tokens.append(text)
    result.text_offset.append(offset)
    if position is None:
        result.token_logprobs.append(None)
        result.top_logprobs.append(None)
        return
    result.token_logprobs.append(position[token_id].logprob)
    result.top_logprobs.append(dict(_top(tokenizer, position, num_top)) if num_top else {})


def chat_logprobs(tokenizer: Any, completion: CompletionOutput, num_top: int,
                  start: int = 0) -> ChatChoiceLogProbs:
    """Chat-shaped logprobs of completion tokens [start:]."""
    content = []
    positions = completion.logprobs or []
    for token_id, position in zip(completion.token_ids[start:], positions[start:]):
        text = _text(tokenizer, token_id, position)
        top = [TopLogprob(token=t, logprob=lp, bytes=list(t.encode()))
               for t, lp in _top(tokenizer, position, num_top)]
        content.append(ChatCompletionLogProb(token=text, logprob=position[token_id].logprob,
                                             bytes=list(text.encode()), top_logprobs=top))
    return ChatChoiceLogProbs(content=content)
