"""Ollama's Go prompt templates translated to Jinja chat templates.

Two common shapes are understood: the per-turn template (``{{ .System }}``, ``{{ .Prompt }}``,
``{{ .Response }}``, rendered once per user turn with the assistant's answer after
``.Response``) and the message loop (``{{ range .Messages }} ... {{ .Role }} ...
{{ .Content }} ... {{ end }}``), with ``if``/``else if``/``else``/``end`` over a field,
``eq``/``ne`` against a string, ``not``, and ``{{-``/``-}}`` trimming. Anything else (tools,
functions, variables, pipelines) raises ValueError saying what was not understood.
A text that already is Jinja (``{%`` or ``messages``) is returned as it is.
"""

from __future__ import annotations

import re

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_FIELD = re.compile(r"\$?\.(System|Prompt|Response|Role|Content)\Z")
_COMPARE = re.compile(r'(eq|ne)\s+(\$?\.\w+)\s+"([^"\\]*)"\Z')
_TOP = {"System": "System", "Prompt": "Prompt", "Response": "Response"}
_ITEM = {"Role": "message.role", "Content": "message.content"}


def is_jinja(text: str) -> bool:
    return "{%" in text or re.search(r"\{\{-?\s*(messages|message|bos_token)\b", text) is not None


def to_jinja(text: str) -> str:
    """A Jinja chat template equivalent to the Go template `text` (or `text` if Jinja)."""
    if is_jinja(text):
        return text
    if re.search(r"\{\{-?\s*range\s+\.Messages\s*-?\}\}", text):
        # Jinja drops the source's final newline; an empty expression after it keeps it
        return _PREAMBLE + _translate(text, in_loop=False) + "{{ '' }}"
    head, tail = _split_at_response(text)
    return _PREAMBLE + _PER_TURN.format(head=_translate(head, in_loop=False),
                                        tail=_translate(tail, in_loop=False))


_PREAMBLE = ("{%- set System = messages | selectattr('role', 'equalto', 'system') "
             "| map(attribute='content') | join('\\n') -%}"
             "{%- set Prompt = (messages | selectattr('role', 'equalto', 'user') | list "
             "| last | default({'content': ''}))['content'] -%}"
             "{%- set Response = '' -%}")

# Rendered once per user turn; the turn's answer follows, and the last turn is left open.
_PER_TURN = ("{{%- set ns = namespace(first=true) -%}}"
             "{{%- for message in messages -%}}{{%- if message.role == 'user' -%}}"
             "{{%- set System = System if ns.first else '' -%}}"
             "{{%- set ns.first = false -%}}"
             "{{%- set Prompt = message.content -%}}"
             "{{%- set answer = messages[loop.index] if loop.index < messages | length "
             "else none -%}}"
             "{{%- set Response = answer.content if answer is not none "
             "and answer.role == 'assistant' else '' -%}}"
             "{head}{{% if Response %}}{{{{ Response }}}}{tail}{{% endif %}}"
             "{{%- endif -%}}{{%- endfor -%}}")


def _split_at_response(text: str) -> tuple[str, str]:
    """The template before and after its top-level ``{{ .Response }}``."""
    match = re.search(r"\{\{-?\s*\.Response\s*-?\}\}", text)
    if match is None:
        return text, ""
    return text[:match.start()], text[match.end():]


def _translate(text: str, in_loop: bool) -> str:
    out: list[str] = []
    blocks: list[str] = []
    pos = 0
    after_block = False
    for match in _ACTION.finditer(text):
        out.append(_literal(text[pos:match.start()], after_block))
        pos = match.end()
        left, action, right = match.groups()
        out.append(_action(action, left, right, blocks, in_loop or "range" in blocks))
        after_block = out[-1].startswith("{%")
    if blocks:
        raise ValueError(f"an unclosed {{{{ {blocks[-1]} }}}} block")
    out.append(_literal(text[pos:], after_block))
    return "".join(out)


def _literal(text: str, after_block: bool = False) -> str:
    """Template text as Jinja text (braces and percent signs kept literal; a newline right
    after a block tag kept, which Jinja's trim_blocks would drop)."""
    if after_block and text.startswith("\n"):
        return "{{ '\\n' }}" + _literal(text[1:])
    if "{{" in text or "{%" in text or "{#" in text:
        return "{{ " + repr(text) + " }}"
    return text


def _action(action: str, left: str, right: str, blocks: list[str], in_loop: bool) -> str:
    def tag(body: str) -> str:
        return "{%" + left + " " + body + " " + right + "%}"

    words = action.split(None, 1)
    keyword = words[0] if words else ""
    rest = words[1] if len(words) > 1 else ""
    if keyword == "if":
        blocks.append("if")
        return tag("if " + _condition(rest, in_loop))
    if keyword == "else":
        if rest.startswith("if "):
            return tag("elif " + _condition(rest[3:], in_loop))
        if rest:
            raise ValueError(f"{{{{ else {rest} }}}} is not understood")
        return tag("else")
    if keyword == "end":
        if not blocks:
            raise ValueError("{{ end }} without a block")
        return tag("endfor" if blocks.pop() == "range" else "endif")
    if keyword == "range":
        if rest != ".Messages":
            raise ValueError(f"{{{{ range {rest} }}}} is not understood (only range .Messages)")
        blocks.append("range")
        return tag("for message in messages")
    return "{{" + left + " " + _value(action, in_loop) + " " + right + "}}"


def _value(expr: str, in_loop: bool) -> str:
    match = _FIELD.match(expr)
    if match is None:
        raise ValueError(f"{{{{ {expr} }}}} is not understood; pagoda translates .System, "
                         f".Prompt, .Response, .Role, .Content, if/else/end and range "
                         f".Messages (write the template in Jinja instead)")
    name = match.group(1)
    if name in _ITEM:
        if not in_loop or expr.startswith("$"):
            raise ValueError(f"{{{{ {expr} }}}} is only meaningful inside range .Messages")
        return _ITEM[name]
    return _TOP[name]


def _condition(expr: str, in_loop: bool) -> str:
    if expr.startswith("not "):
        return "not (" + _condition(expr[4:].strip(), in_loop) + ")"
    compare = _COMPARE.match(expr)
    if compare is not None:
        op = "==" if compare.group(1) == "eq" else "!="
        return f"{_value(compare.group(2), in_loop)} {op} {compare.group(3)!r}"
    return _value(expr, in_loop)
