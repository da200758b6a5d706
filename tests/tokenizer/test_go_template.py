"""Ollama's Go prompt templates translated to Jinja render what Ollama renders."""

from __future__ import annotations

import pytest

from pagoda.tokenizer.chat_template import render_template
from pagoda.tokenizer.go_template import to_jinja

CONVERSATION = [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}]
PER_TURN = ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
            "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
            "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n")
MESSAGE_LOOP = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
                "{{ end }}<|im_start|>assistant\n")
CHATML = ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nu1<|im_end|>\n"
          "<|im_start|>assistant\na1<|im_end|>\n<|im_start|>user\nu2<|im_end|>\n"
          "<|im_start|>assistant\n")


def render(template: str, messages: list[dict[str, str]]) -> str:
    return render_template(to_jinja(template), {"messages": messages})


def test_per_turn_template_renders_every_turn_and_leaves_the_last_open():
    assert render(PER_TURN, CONVERSATION) == CHATML


def test_message_loop_template_keeps_newlines_jinja_would_trim():
    assert render(MESSAGE_LOOP, CONVERSATION) == CHATML


def test_conditions_on_roles():
    template = ('{{ range .Messages }}{{ if eq .Role "user" }}U:{{ .Content }}'
                '{{ else if eq .Role "assistant" }}A:{{ .Content }}{{ else }}'
                '{{ end }}{{ end }}{{ if not .System }}-{{ end }}')
    assert render(template, CONVERSATION) == "U:u1A:a1U:u2"
    assert render(template, CONVERSATION[1:2]) == "U:u1-"


def test_jinja_is_kept_as_it_is():
    jinja = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert to_jinja(jinja) == jinja


@pytest.mark.parametrize("template, says", [
    ("{{ .Tools }}", ".Tools"),
    ("{{ range .Tools }}x{{ end }}", "range .Tools"),
    ("{{ if .System }}x", "unclosed"),
    ("x{{ end }}", "without a block"),
    ("{{ .Content }}", "only meaningful inside range"),
    ("{{ json .Prompt }}", "json .Prompt"),
])
def test_other_go_templates_are_refused_saying_why(template, says):
    with pytest.raises(ValueError, match=None) as refused:
        to_jinja(template)
    assert says in str(refused.value)
