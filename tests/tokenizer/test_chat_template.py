"""pagoda's chat-template sandbox: the same text as transformers, within a time and size budget."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from pagoda.cli.serve import read_chat_template
from pagoda.errors import ConfigError, InvalidRequestError
from pagoda.tokenizer import chat_template as ct
from pagoda.tokenizer.chat_template import (
    compile_template,
    render_chat,
    render_template,
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "Capital of Japan?"}],
    [{"role": "user", "content": "héllo \"quoted\" <b>tags</b> & ünïcödé 🙂"},
     {"role": "assistant", "content": "Hi!\n\n  Indented line\n"},
     {"role": "user", "content": "  leading and trailing spaces  "}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "{{ not jinja }} {% x %}"},
     {"role": "assistant", "content": "ok", "name": None}],
]

# A template that exercises what transformers gives templates beyond messages.
TOOLS_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(first=true) -%}
{% if tools %}Tools:
{% for tool in tools %}{{ tool | tojson(indent=2) }}
{% endfor %}{% endif %}
{% if documents %}{% for doc in documents %}[{{ doc.title }}] {{ doc.text }}
{% endfor %}{% endif %}
{% for message in messages %}
  {% if message.role == 'tool' %}{{ message.content | tojson }}{% continue %}{% endif %}
  {% if not ns.first %}|{% endif %}{% set ns.first = false %}
  {{ message.role }}: {{ message.content if message.content is defined else '' }}
  {% if message.reasoning_content is defined %}<think>{{ message.reasoning_content }}</think>
  {% endif %}
  {% if message.tool_calls is defined %}{% for call in message.tool_calls %}
    {% generation %}{{ call.function | tojson }}{% endgeneration %}
  {% endfor %}{% endif %}
  {{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}assistant{{ ' (' ~ persona ~ ')' if persona is defined }}:{% endif %}
{{ dict(a=1, b='é') | tojson }}{{ dict.fromkeys(['x']) | tojson }}
"""

RUNAWAY = ("{% for i in range(100000) %}{% for j in range(100000) %}"
           "{% endfor %}{% endfor %}done")  # 10^10 silent iterations

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city (°C)",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": None, "reasoning_content": "use the tool",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                      "arguments": {"city": "Zürich"}}}]},
    {"role": "tool", "content": "{\"temp\": 21}", "tool_call_id": "call_1"},
]


def fails_fast(source: str, variables: dict | None = None, limit_s: float = 3.0
               ) -> InvalidRequestError:
    start = time.monotonic()
    with pytest.raises(InvalidRequestError) as info:
        render_template(source, {"messages": CONVERSATIONS[0], **(variables or {})})
    assert time.monotonic() - start < limit_s
    return info.value


# ---- same text as transformers ---------------------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_smollm2_matches_transformers(smollm2_tokenizer, conversation, add_generation_prompt):
    ours = render_chat(smollm2_tokenizer, conversation,
                       add_generation_prompt=add_generation_prompt)
    theirs = smollm2_tokenizer.apply_chat_template(conversation, tokenize=False,
                                                   add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert ours.count("<|im_start|>") >= len(conversation)


def test_smollm2_continue_final_message_matches_transformers(smollm2_tokenizer):
    conversation = [*CONVERSATIONS[1], {"role": "assistant", "content": "Tok"}]
    ours = render_chat(smollm2_tokenizer, conversation, continue_final_message=True)
    theirs = smollm2_tokenizer.apply_chat_template(conversation, tokenize=False,
                                                   continue_final_message=True)
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\nTok")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("with_tools", [True, False])
def test_tools_documents_and_kwargs_match_transformers(smollm2_tokenizer, with_tools,
                                                       add_generation_prompt):
    tools = TOOLS if with_tools else None
    kwargs = {"persona": "terse", "documents": [{"title": "Doc", "text": "Zürich is in CH"}]}
    ours = render_chat(smollm2_tokenizer, TOOL_CHAT, TOOLS_TEMPLATE, add_generation_prompt,
                       chat_template_kwargs=kwargs, tools=tools)
    theirs = smollm2_tokenizer.apply_chat_template(
        TOOL_CHAT, tools=tools, chat_template=TOOLS_TEMPLATE, tokenize=False,
        add_generation_prompt=add_generation_prompt, **kwargs)
    assert ours == theirs
    assert ('Tools:\n{\n  "type": "function"' in ours) == with_tools  # tojson indent=2
    assert ("(°C)" in ours) == with_tools  # tojson keeps non-ASCII
    assert "<think>use the tool</think>" in ours
    assert ours.startswith("<|im_start|>")


def test_special_tokens_and_kwargs_reach_the_template():
    tokenizer = SimpleNamespace(chat_template="{{ bos_token }}{{ eos_token }}{{ x }}",
                                special_tokens_map={"bos_token": "<s>", "eos_token": "</s>"})
    text = render_chat(tokenizer, CONVERSATIONS[0], chat_template_kwargs={"x": 7})
    assert text == "<s></s>7"
    assert render_chat(tokenizer, CONVERSATIONS[0],
                       chat_template_kwargs={"bos_token": "[B]"}).startswith("[B]")


def test_named_templates_pick_default_tool_use_or_the_named_one():
    tokenizer = SimpleNamespace(chat_template={"default": "D", "tool_use": "T", "rag": "R"})
    assert render_chat(tokenizer, CONVERSATIONS[0]) == "D"
    assert render_chat(tokenizer, CONVERSATIONS[0], tools=TOOLS) == "T"
    assert render_chat(tokenizer, CONVERSATIONS[0], chat_template="rag") == "R"


def test_missing_template_and_empty_messages_are_request_errors():
    with pytest.raises(InvalidRequestError) as info:
        render_chat(SimpleNamespace(chat_template=None), CONVERSATIONS[0])
    assert info.value.param == "chat_template"
    with pytest.raises(InvalidRequestError) as info:
        render_chat(SimpleNamespace(chat_template="x"), [])
    assert info.value.param == "messages"


# ---- budget ----------------------------------------------------------------------------------


def test_huge_output_stops_at_the_size_cap():
    source = ("{% for i in range(10000) %}{% for j in range(10000) %}" + "x" * 64
              + "{% endfor %}{% endfor %}")  # 10^8 repeats
    error = fails_fast(source)
    assert error.param == "chat_template" and "longer than" in error.message


def test_one_huge_value_is_refused_before_it_is_built():
    assert "beyond the render budget" in fails_fast("{{ 'x' * 100000000 }}").message
    assert "beyond the render budget" in fails_fast("{{ 10 ** (10 ** 10) }}").message


@pytest.mark.parametrize("op", ["~", "+"])
def test_doubling_a_string_is_refused(op):
    source = ("{% set ns = namespace(s='x') %}{% for i in range(64) %}"
              f"{{% set ns.s = ns.s {op} ns.s %}}{{% endfor %}}{{{{ ns.s | length }}}}")
    assert "beyond the render budget" in fails_fast(source).message


def test_join_of_aliased_strings_is_refused():
    source = "{{ (['x' * 4000000] * 1000) | join }}"
    assert "beyond the render budget" in fails_fast(source).message


def test_oversized_messages_are_blamed_on_messages():
    huge = [{"role": "user", "content": "y" * (ct.MAX_RENDERED_CHARS + 1)}]
    with pytest.raises(InvalidRequestError) as info:
        render_chat(SimpleNamespace(chat_template="{{ messages[0].content }}"), huge)
    assert info.value.param == "messages"


def test_nested_loops_without_output_hit_the_time_budget():
    error = fails_fast(RUNAWAY)
    assert error.param == "chat_template" and "time budget" in error.message


def test_exponential_recursive_macro_hits_the_time_budget():
    source = ("{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}"
              "{% endmacro %}{{ f(64) }}")
    assert "time budget" in fails_fast(source).message


def test_unbounded_recursive_macro_is_refused():
    source = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"
    assert fails_fast(source).param == "chat_template"


def test_trace_hook_is_removed_after_a_render_and_after_a_timeout():
    before = sys.gettrace()
    render_template("{{ 1 }}", {})
    assert sys.gettrace() is before
    fails_fast(RUNAWAY)
    assert sys.gettrace() is before


def test_budget_only_traces_the_rendering_thread():
    before = sys.gettrace()
    errors: list[InvalidRequestError] = []

    def work() -> None:
        try:
            render_template(RUNAWAY, {})
        except InvalidRequestError as exc:
            errors.append(exc)

    worker = threading.Thread(target=work)
    worker.start()
    time.sleep(0.3)
    assert sys.gettrace() is before  # this thread runs untraced meanwhile
    worker.join(5)
    assert len(errors) == 1 and "time budget" in errors[0].message


def test_template_source_length_is_capped():
    with pytest.raises(InvalidRequestError) as info:
        render_template("x" * (ct.MAX_TEMPLATE_CHARS + 1), {})
    assert info.value.param == "chat_template"


def test_compiled_templates_are_cached_by_source():
    source = "{{ messages | length }} cached"
    assert compile_template(source) is compile_template(source)
    assert compile_template(source) is not compile_template(source + " ")


# ---- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["{% for m in messages %}", "{{ 1 + }}", "{% endif %}",
                                    "{% foo %}"])
def test_syntax_errors_are_request_errors(source):
    with pytest.raises(InvalidRequestError) as info:
        render_template(source, {"messages": []})
    assert info.value.param == "chat_template" and "not valid Jinja" in info.value.message


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__globals__['sys'] }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{% set ns = namespace(_hidden=1) %}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{{ messages.append(1) }}",
])
def test_sandbox_escapes_are_request_errors(source):
    with pytest.raises(InvalidRequestError) as info:
        render_template(source, {"messages": [{"role": "user", "content": "hi"}]})
    assert info.value.param == "chat_template"


def test_raise_exception_reaches_the_client_as_a_messages_error():
    with pytest.raises(InvalidRequestError) as info:
        render_template("{{ raise_exception('Conversation roles must alternate') }}", {})
    assert info.value.param == "messages"
    assert "Conversation roles must alternate" in info.value.message


# ---- --chat-template --------------------------------------------------------------------------


def test_chat_template_flag_reads_inline_text():
    inline = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert read_chat_template(inline) == inline
    long_inline = "{{ 'a' }}" + "b" * 400  # too long to be a file name
    assert read_chat_template(long_inline) == long_inline
    assert read_chat_template(None) is None


def test_chat_template_flag_reads_a_file(tmp_path: Path):
    path = tmp_path / "template.jinja"
    path.write_text("{{ messages[0].content }}é\n", encoding="utf-8")
    text = read_chat_template(str(path))
    assert text == "{{ messages[0].content }}é\n"
    tokenizer = SimpleNamespace(chat_template=None)
    assert render_chat(tokenizer, CONVERSATIONS[0], chat_template=text) == \
        CONVERSATIONS[0][0]["content"] + "é"


def test_chat_template_flag_rejects_missing_files_and_bad_templates(tmp_path: Path):
    with pytest.raises(ConfigError, match="neither a file"):
        read_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ConfigError, match="not valid Jinja"):
        read_chat_template("{% for m in messages %}")
    bad = tmp_path / "bad.jinja"
    bad.write_text("{{ oops ")
    with pytest.raises(ConfigError, match="not valid Jinja"):
        read_chat_template(str(bad))


def test_renders_tools_tells_a_template_that_drops_tools(smollm2_tokenizer):
    """SmolLM2's ChatML template ignores `tools`; a template that prints them renders them;
    one that cannot render a conversation at all says nothing about tools."""
    from pagoda.tokenizer.chat_template import renders_tools
    assert renders_tools(smollm2_tokenizer) is False
    assert renders_tools(smollm2_tokenizer, TOOLS_TEMPLATE) is True
    assert renders_tools(SimpleNamespace(chat_template=None)) is None
