"""Qwen2.5's and Qwen3's formats: a test tokenizer (SmolLM2's vocabulary with Qwen's
<tool_call> and <think> added tokens) carrying templates with the structure of Qwen's
official ones (templates/). pagoda detects hermes and qwen3 from them, renders tools and
enable_thinking, and parses <tool_call> and <think> output, whole and streamed (here, and
through a real server on a tiny random model)."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import httpx
import jsonschema
import pytest
from tokenizers import AddedToken

from pagoda.entrypoints.openai.chat_output import (
    ChoiceMessage,
    ChoiceStream,
    ToolSetup,
    whole_message,
)
from pagoda.entrypoints.openai.output_parsers import OutputParsers
from pagoda.entrypoints.openai.protocol import ChatCompletionRequest
from pagoda.entrypoints.openai.reasoning_parsers import Qwen3ReasoningParser
from pagoda.entrypoints.openai.tool_parsers import HermesToolParser
from pagoda.tokenizer.chat_template import render_chat
from pagoda.tokenizer.hf_tokenizer import load_hf_tokenizer
from tests.entrypoints.openai.test_chat_output import calls, streamed
from tests.utils import RemoteServer, save_random_checkpoint

TEMPLATES = Path(__file__).parent / "templates"
# Qwen's tokenizers hold these as added tokens that are not special (decoding keeps them)
QWEN_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>",
               "</think>")
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
       "required": ["a", "b"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather (°C)",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
ASK = [{"role": "user", "content": "Weather in Zürich, and 2 + 3?"}]
HISTORY = [
    {"role": "system", "content": "Be brief."},
    *ASK,
    {"role": "assistant", "content": "", "reasoning_content": "Two tools.", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}},
        {"id": "call_2", "type": "function",
         "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "21 °C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "5"},
]
# what Qwen3 answers: its reasoning, then two calls in Hermes' blocks
QWEN3_OUTPUT = ('<think>\nThe user wants the weather and a sum.\n</think>\n\n'
                '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n'
                '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n'
                '</tool_call>')


@pytest.fixture(scope="module")
def qwen_tokenizers(tmp_path_factory, smollm2_dir) -> dict[str, Path]:
    """A tokenizer directory per template, saved as a Qwen checkpoint's would be."""
    from transformers import AutoTokenizer
    dirs = {}
    for name in ("qwen2_5", "qwen3"):
        tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                              for t in QWEN_TOKENS])
        tokenizer.chat_template = (TEMPLATES / f"{name}.jinja").read_text()
        dirs[name] = tmp_path_factory.mktemp(name)
        tokenizer.save_pretrained(dirs[name])
    return dirs


@pytest.fixture(scope="module")
def qwen3_tokenizer(qwen_tokenizers):
    return load_hf_tokenizer(qwen_tokenizers["qwen3"])


def conversation(messages: list[dict]) -> list[dict]:
    """The messages as the server hands them to the template."""
    return ChatCompletionRequest(messages=messages).conversation()


@pytest.mark.parametrize("name, reasoning", [("qwen2_5", None), ("qwen3", "qwen3")])
def test_detects_hermes_and_qwen3_reasoning(qwen_tokenizers, name, reasoning):
    tokenizer = load_hf_tokenizer(qwen_tokenizers[name])
    assert [tokenizer.convert_ids_to_tokens(i) for i in tokenizer.encode(
        "<tool_call><think>", add_special_tokens=False)] == ["<tool_call>", "<think>"]
    parsers = OutputParsers.resolve(None, None, tokenizer.chat_template)
    assert isinstance(parsers.tools, HermesToolParser)
    assert (parsers.reasoning and parsers.reasoning.name) == reasoning


@pytest.mark.parametrize("name", ["qwen2_5", "qwen3"])
def test_tools_calls_and_results_render_as_qwen_does(qwen_tokenizers, name):
    tokenizer = load_hf_tokenizer(qwen_tokenizers[name])
    messages = conversation(HISTORY)
    ours = render_chat(tokenizer, messages, tools=TOOLS)
    assert ours == tokenizer.apply_chat_template(messages, tools=TOOLS, tokenize=False,
                                                 add_generation_prompt=True)
    system = ours[:ours.index("<|im_end|>")]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    listed = system[system.index("<tools>\n") + 8:system.index("\n</tools>")]
    assert [json.loads(line) for line in listed.split("\n")] == TOOLS
    assert ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>'
            '\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
            '<|im_end|>\n') in ours
    assert ours.endswith("<|im_start|>user\n<tool_response>\n21 °C\n</tool_response>\n"
                         "<tool_response>\n5\n</tool_response><|im_end|>\n"
                         "<|im_start|>assistant\n")
    # the reasoning of a turn after the last query is kept (Qwen3), else dropped
    assert ("<think>\nTwo tools.\n</think>" in ours) == (name == "qwen3")


def test_qwen2_5_default_system_prompt(qwen_tokenizers):
    tokenizer = load_hf_tokenizer(qwen_tokenizers["qwen2_5"])
    assert render_chat(tokenizer, ASK) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n<|im_start|>user\nWeather in Zürich, and 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_enable_thinking_reaches_the_template(qwen3_tokenizer):
    thinking = render_chat(qwen3_tokenizer, ASK)
    assert thinking.endswith("<|im_start|>assistant\n")
    for kwargs in ({"enable_thinking": False}, {"enable_thinking": True}):
        ours = render_chat(qwen3_tokenizer, ASK, chat_template_kwargs=kwargs)
        assert ours == qwen3_tokenizer.apply_chat_template(ASK, tokenize=False,
                                                           add_generation_prompt=True, **kwargs)
    assert render_chat(qwen3_tokenizer, ASK, chat_template_kwargs={"enable_thinking": False}) \
        == thinking + "<think>\n\n</think>\n\n"


def token_pieces(tokenizer, text: str) -> list[str]:
    """`text` as a model emits it: one detokenized piece per token."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoded = [tokenizer.decode(ids[:i]) for i in range(len(ids) + 1)]
    return [b[len(a):] for a, b in pairwise(decoded)]


def qwen3_stream() -> ChoiceStream:
    return ChoiceStream(Qwen3ReasoningParser(), ToolSetup("auto", parser=HermesToolParser()))


def test_qwen3_output_parses_whole_and_streamed(qwen3_tokenizer):
    pieces = token_pieces(qwen3_tokenizer, QWEN3_OUTPUT)
    assert "".join(pieces) == QWEN3_OUTPUT and "<tool_call>" in pieces and "</think>" in pieces
    whole = whole_message(qwen3_stream(), QWEN3_OUTPUT)
    expected = [("get_weather", {"city": "Zürich"}), ("add", {"a": 2, "b": 3})]
    assert whole.reasoning == "\nThe user wants the weather and a sum.\n"
    assert calls(whole) == expected and not whole.content
    stream, by_token = qwen3_stream(), ChoiceMessage()
    for piece in pieces:
        for delta in stream.feed(piece):
            by_token.add(delta)
    for delta in stream.finish():
        by_token.add(delta)
    assert calls(by_token) == expected and by_token.reasoning == whole.reasoning
    for seed in range(5):  # and split anywhere
        split = streamed(qwen3_stream(), QWEN3_OUTPUT, seed)
        assert (calls(split), split.reasoning, split.content) == \
            (expected, whole.reasoning, whole.content)


def test_qwen3_answer_without_thinking_is_all_content():
    answer = whole_message(qwen3_stream(), "The capital of France is Paris.")
    assert answer.content == "The capital of France is Paris." and not answer.reasoning


# ---- a real server on a tiny random model with the Qwen3 tokenizer ----------------------------

MODEL = "tiny-qwen3"
# steer the random model into Qwen3's shape: reasoning, then one Hermes call
STEER = (r'<think>\n[a-z]{2,8}( [a-z]{2,8}){0,3}\n</think>\n\n<tool_call>\n\{"name": "add", '
         r'"arguments": \{"a": [1-9], "b": [1-9]\}\}\n</tool_call>')


@pytest.fixture(scope="module")
def server(tmp_path_factory, qwen_tokenizers):
    from transformers import LlamaConfig
    tokenizer_dir = qwen_tokenizers["qwen3"]
    vocab = len(load_hf_tokenizer(tokenizer_dir))
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                         max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=True)
    path = save_random_checkpoint(config, tmp_path_factory.mktemp("tiny-qwen3"), tokenizer_dir)
    # no prefix caching: a repeated request computes exactly as the first did
    srv = RemoteServer(str(path), "--served-model-name", MODEL, "--max-model-len", "1024",
                       "--kv-cache-memory", "32MiB", "--no-enable-prefix-caching")
    yield srv
    assert srv.stop() == 0


def steered(client, **kwargs):
    return client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, max_tokens=96, temperature=0,
        extra_body={"structured_outputs": {"regex": STEER}, **kwargs.pop("extra_body", {})},
        **kwargs)


@pytest.mark.slow
def test_server_parses_qwen3_reasoning_and_tool_calls(server):
    client = server.client()
    whole = steered(client).choices[0]
    assert whole.finish_reason == "tool_calls" and not whole.message.content
    assert 2 <= len(whole.message.reasoning_content.strip()) <= 35
    (call,) = whole.message.tool_calls
    assert call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), ADD)
    reasoning, content, arguments, names, finish = "", "", "", "", None
    for chunk in steered(client, stream=True):
        for choice in chunk.choices:
            delta = choice.delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += delta.content or ""
            for piece in delta.tool_calls or []:
                names += piece.function.name or ""
                arguments += piece.function.arguments or ""
            finish = choice.finish_reason or finish
    assert (reasoning, content, names, finish) == \
        (whole.message.reasoning_content, "", "add", "tool_calls")
    assert json.loads(arguments) == json.loads(call.function.arguments)


@pytest.mark.slow
def test_server_passes_enable_thinking_to_the_template(server):
    body = {"model": MODEL, "messages": ASK, "return_token_strs": True}
    thinking = httpx.post(f"{server.url}/tokenize", json=body).json()
    off = httpx.post(f"{server.url}/tokenize", json={
        **body, "chat_template_kwargs": {"enable_thinking": False}}).json()
    assert off["token_strs"][:thinking["count"]] == thinking["token_strs"]
    assert [t for t in off["token_strs"][thinking["count"]:] if t.strip("Ċ")] == \
        ["<think>", "</think>"]
    response = server.client().chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=4, temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert response.usage.prompt_tokens == off["count"]


@pytest.mark.slow
def test_thinking_switches_of_every_protocol_reach_the_template(server):
    """Anthropic's `thinking`, the Responses API's `reasoning.effort` and Ollama's `think`
    become enable_thinking, as chat_template_kwargs do."""
    body = {"model": MODEL, "messages": ASK}
    thinking = httpx.post(f"{server.url}/tokenize", json=body).json()["count"]
    off = httpx.post(f"{server.url}/tokenize", json={
        **body, "chat_template_kwargs": {"enable_thinking": False}}).json()["count"]
    assert off > thinking

    def anthropic_count(kind: str) -> int:
        return httpx.post(f"{server.url}/v1/messages/count_tokens", json={
            **body, "thinking": {"type": kind}}).json()["input_tokens"]

    assert (anthropic_count("enabled"), anthropic_count("disabled")) == (thinking, off)
    responses = server.client().responses.create(model=MODEL, input=ASK, max_output_tokens=1,
                                                 temperature=0, reasoning={"effort": "none"})
    assert responses.usage.input_tokens == off
    via_ollama = httpx.post(f"{server.url}/api/chat", timeout=60, json={
        **body, "think": False, "stream": False,
        "options": {"temperature": 0, "num_predict": 1}}).json()
    assert via_ollama["prompt_eval_count"] == off
