"""Chat templates: render a conversation to prompt text in pagoda's own Jinja sandbox.

The template sees what transformers' ``apply_chat_template(..., tokenize=False)`` gives it
(``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the special tokens,
``raise_exception``, ``strftime_now``, a non-escaping ``tojson``, loop controls, trimmed
blocks), so the text is the same. Unlike transformers, rendering runs under a budget: the
source, the rendered text and the time spent are capped, strings, lists and integers that
the template grows with ``*``, ``**``, ``+``, ``~`` or ``join`` are refused before they pass
the output cap, and every failure is an :class:`InvalidRequestError`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache
from types import FrameType
from typing import Any, ClassVar, NoReturn

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.ext import Extension, loopcontrols
from jinja2.filters import do_join
from jinja2.runtime import markup_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from pagoda.errors import InvalidRequestError

Conversation = list[dict[str, Any]]

MAX_TEMPLATE_CHARS = 256 << 10  # template source
MAX_RENDERED_CHARS = 4 << 20  # rendered text, and any string or list built on the way
RENDER_TIME_LIMIT_S = 2.0  # compile + render, wall clock of the rendering thread
MAX_INT_BITS = 1 << 16  # integers built with * and **
MAX_JSON_INDENT = 64
TEMPLATE_CACHE_SIZE = 32

_CLOCK_EVERY = 256  # trace events between two clock reads
_TEMPLATE_FILENAME = "<template>"  # what jinja names the code it compiles from a string
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for continue_final_message
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_PROBE_TOOL = "pagoda_probe_tool"  # renders_tools() looks for it in the prompt


# ---- public API ------------------------------------------------------------------------------


def render_chat(tokenizer: Any, messages: Conversation, chat_template: str | None = None,
                add_generation_prompt: bool = True,
                chat_template_kwargs: dict[str, Any] | None = None,
                continue_final_message: bool = False,
                tools: list[dict[str, Any]] | None = None) -> str:
    """The prompt text for a conversation (special tokens included, so no BOS is re-added)."""
    if not messages:
        raise InvalidRequestError("messages must not be empty", "messages")
    source = _template_source(tokenizer, chat_template, tools)
    variables = _variables(tokenizer, messages, tools, chat_template_kwargs,
                           add_generation_prompt and not continue_final_message)
    final_text = _mark_final_message(variables["messages"]) if continue_final_message else None
    text = render_template(source, variables, size_param=_size_param(variables))
    return text if final_text is None else _cut_at_tag(text, final_text)


def renders_tools(tokenizer: Any, chat_template: str | None = None) -> bool | None:
    """Whether the chat template puts a request's tools into the prompt: a probe tool's name
    must appear in the rendered text. None when the template cannot render a plain
    conversation at all (nothing to say about its tools)."""
    tools = [{"type": "function", "function": {
        "name": _PROBE_TOOL, "description": "probe", "parameters": {"type": "object"}}}]
    try:
        text = render_chat(tokenizer, [{"role": "user", "content": "hi"}], chat_template,
                           tools=tools)
    except InvalidRequestError:
        return None
    return _PROBE_TOOL in text


def render_template(source: str, variables: Mapping[str, Any],
                    size_param: str = "chat_template") -> str:
    """Compile (cached) and render ``source`` in the sandbox, within the time and size budget.

    ``size_param`` is the request field blamed when the output outgrows MAX_RENDERED_CHARS.
    """
    check_source(source)
    with _as_request_errors(), _Deadline(RENDER_TIME_LIMIT_S):
        return _render(_compile(source), variables, size_param)


def compile_template(source: str) -> jinja2.Template:
    """``source`` compiled (cached), or InvalidRequestError if it is too long or not Jinja."""
    check_source(source)
    with _as_request_errors(), _Deadline(RENDER_TIME_LIMIT_S):
        return _compile(source)


def check_source(source: Any) -> None:
    """Refuse a template that is not text or is longer than MAX_TEMPLATE_CHARS."""
    if not isinstance(source, str):
        raise InvalidRequestError("the chat template must be a string", "chat_template")
    if len(source) > MAX_TEMPLATE_CHARS:
        raise InvalidRequestError(f"the chat template is {len(source)} characters long; the "
                                  f"limit is {MAX_TEMPLATE_CHARS}", "chat_template")


# ---- budget ----------------------------------------------------------------------------------


class _Exceeded(BaseException):
    """A budget ran out mid-render. A BaseException, so no ``except Exception`` on the way
    (in jinja or a filter) can swallow it and let the render run on unchecked."""

    def __init__(self, message: str, param: str = "chat_template") -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class _Deadline:
    """A trace hook on the current thread only: every Python call, and every line of template
    code, counts as an event; every _CLOCK_EVERY events the clock is read, and past the
    deadline the hook raises _Exceeded.

    Template lines make loops that print nothing (nested ranges) count; calls make recursion
    and filter-heavy work count. Lines outside template code are not traced (that would
    triple the cost of an ordinary render). A hook that raises is removed by CPython; the
    previous hook (a debugger, coverage) is put back on exit.
    """

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._deadline = 0.0
        self._left = _CLOCK_EVERY
        self._previous: Callable[..., Any] | None = None

    def __enter__(self) -> _Deadline:
        self._deadline = time.monotonic() + self._seconds
        self._previous = sys.gettrace()
        sys.settrace(self._trace)
        return self

    def __exit__(self, *exc_info: object) -> None:
        sys.settrace(self._previous)

    def _trace(self, frame: FrameType, event: str, arg: Any) -> Callable[..., Any] | None:
        self._left -= 1
        if self._left <= 0:
            self._left = _CLOCK_EVERY
            if time.monotonic() > self._deadline:
                raise _Exceeded(f"the chat template ran past its {self._seconds:g} s time "
                                f"budget (a loop or recursion that does not end soon enough)")
        return self._trace if frame.f_code.co_filename == _TEMPLATE_FILENAME else None


def _render(template: jinja2.Template, variables: Mapping[str, Any], size_param: str) -> str:
    """Stream the render, stopping as soon as the text passes MAX_RENDERED_CHARS."""
    parts: list[str] = []
    size = 0
    chunks = template.generate(**variables)
    try:
        for chunk in chunks:
            size += len(chunk)
            if size > MAX_RENDERED_CHARS:
                raise _Exceeded(f"the rendered chat is longer than {MAX_RENDERED_CHARS} "
                                f"characters", size_param)
            parts.append(chunk)
    finally:
        chunks.close()
    return "".join(parts)


def _too_big(what: str = "a value") -> NoReturn:
    raise _Exceeded(f"the chat template built {what} beyond the render budget "
                    f"({MAX_RENDERED_CHARS} characters, {MAX_INT_BITS}-bit integers)")


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse ``*``, ``**`` and ``+`` whose result would outgrow the budget, before it is built."""
    if operator == "**":
        if (_is_int(left) and _is_int(right) and abs(left) > 1 and right > 0
                and abs(left).bit_length() * right > MAX_INT_BITS):
            _too_big("an integer")
    elif operator == "*":
        if _is_int(left) and _is_int(right):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                _too_big("an integer")
        elif _is_int(left) or _is_int(right):
            sequence, count = (right, left) if _is_int(left) else (left, right)
            if _is_sized(sequence) and len(sequence) * count > MAX_RENDERED_CHARS:
                _too_big("a string or list")
    elif (operator == "+" and _is_sized(left) and _is_sized(right)
          and len(left) + len(right) > MAX_RENDERED_CHARS):
        _too_big("a string or list")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_sized(value: Any) -> bool:
    return isinstance(value, (str, list, tuple))


# ---- the sandbox -----------------------------------------------------------------------------


class _BudgetCodeGenerator(CodeGenerator):
    """Compiles ``a ~ b`` into a call that checks the joined length before joining."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        escape = ("context.eval_ctx.autoescape" if frame.eval_ctx.volatile
                  else repr(bool(frame.eval_ctx.autoescape)))
        self.write("environment.checked_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write(f"), {escape})")


class _GenerationTag(Extension):
    """transformers' ``{% generation %}...{% endgeneration %}``: renders its body as is."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _SandboxEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with growing operators checked and unsafe access an error."""

    code_generator_class = _BudgetCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+"})

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any,
                   right: Any) -> Any:
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def checked_concat(self, values: tuple[Any, ...], autoescape: bool) -> str:
        """``~``: join the operands, unless that would pass MAX_RENDERED_CHARS."""
        texts = [value if isinstance(value, str) else str(value) for value in values]
        if sum(map(len, texts)) > MAX_RENDERED_CHARS:
            _too_big("a string")
        return markup_join(values) if autoescape else "".join(texts)

    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:
        """Fail at once, where jinja would return an undefined that prints as ''."""
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} "
                            f"object is unsafe")


class _DictFactory:
    """The template's ``dict``: builds dicts without handing out the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, keys: Any, value: Any = None) -> dict[Any, Any]:
        return dict.fromkeys(keys, value)


class _Namespace(Namespace):
    """jinja's ``namespace``, refusing underscore-prefixed names."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # jinja's signature, so self= works
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        super().__setitem__(name, value)


def _check_namespace_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(f"namespace attribute {name!r} may not start with '_'")


def _raise_exception(message: Any) -> NoReturn:
    raise TemplateError(str(message))


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """JSON as transformers' templates expect it: no HTML escaping, non-ASCII kept."""
    width = len(indent) if isinstance(indent, str) else indent
    if isinstance(width, int) and width > MAX_JSON_INDENT:
        _too_big("a JSON indent")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@jinja2.pass_eval_context
def _join(eval_ctx: nodes.EvalContext, value: Any, d: str = "",
          attribute: str | int | None = None) -> str:
    """jinja's ``join``, refusing to build more than MAX_RENDERED_CHARS of strings."""
    items = list(value)
    texts = sum(len(item) for item in items if isinstance(item, str))
    if texts + len(str(d)) * len(items) > MAX_RENDERED_CHARS:
        _too_big("a string")
    return do_join(eval_ctx, items, d, attribute)


def _environment() -> _SandboxEnvironment:
    env = _SandboxEnvironment(trim_blocks=True, lstrip_blocks=True,
                              extensions=[loopcontrols, _GenerationTag])
    env.filters.update(tojson=_tojson, join=_join)
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_DictFactory(), namespace=_Namespace)
    return env


_ENVIRONMENT = _environment()


@lru_cache(maxsize=TEMPLATE_CACHE_SIZE)
def _compile(source: str) -> jinja2.Template:
    return _ENVIRONMENT.from_string(source)


# ---- errors ----------------------------------------------------------------------------------


@contextmanager
def _as_request_errors() -> Iterator[None]:
    """Turn whatever compiling or rendering raised into an InvalidRequestError."""
    try:
        yield
    except _Exceeded as exc:
        raise InvalidRequestError(exc.message, exc.param) from None
    except InvalidRequestError:
        raise
    except Exception as exc:  # the template's fault (or the messages'), never the engine's
        raise _request_error(exc) from None


def _request_error(exc: Exception) -> InvalidRequestError:
    if isinstance(exc, TemplateSyntaxError):
        return InvalidRequestError(f"the chat template is not valid Jinja (line {exc.lineno}): "
                                   f"{_brief(exc.message)}", "chat_template")
    if isinstance(exc, SecurityError):
        return InvalidRequestError(f"the chat template is not allowed to do that: "
                                   f"{_brief(exc.message)}", "chat_template")
    if isinstance(exc, TemplateError):  # raise_exception(...), undefined values
        return InvalidRequestError(f"the chat template refused these messages: "
                                   f"{_brief(exc.message)}", "messages")
    if isinstance(exc, RecursionError):
        return InvalidRequestError("the chat template recursed too deeply", "chat_template")
    if isinstance(exc, (OverflowError, MemoryError)):
        return InvalidRequestError(f"the chat template exceeded the sandbox's limits: "
                                   f"{type(exc).__name__}", "chat_template")
    return InvalidRequestError(f"the chat template could not render these messages: "
                               f"{type(exc).__name__}", "messages")


def _brief(message: str | None, limit: int = 300) -> str:
    text = message or "(no message)"
    return text if len(text) <= limit else text[:limit] + "..."


# ---- template inputs -------------------------------------------------------------------------


def _template_source(tokenizer: Any, chat_template: str | None, tools: Any) -> str:
    """The template to use: the one given (or named), else the tokenizer's own."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, Mapping):  # several named templates
        if chat_template is not None:
            return own.get(chat_template, chat_template)
        name = "tool_use" if tools is not None and "tool_use" in own else "default"
        if name not in own:
            raise InvalidRequestError("this model has several chat templates and no default; "
                                      "pass one explicitly", "chat_template")
        return own[name]
    if chat_template is not None:
        return chat_template
    if not own:
        raise InvalidRequestError("this model has no chat template; pass one explicitly",
                                  "chat_template")
    return own


def _variables(tokenizer: Any, messages: Conversation, tools: Any,
               chat_template_kwargs: Mapping[str, Any] | None,
               add_generation_prompt: bool) -> dict[str, Any]:
    """What the template sees, built like transformers builds it (plain JSON-like data)."""
    try:
        extra = _plain(dict(chat_template_kwargs or {}))
        documents = extra.pop("documents", None)
        tools = _plain(tools) if tools is not None else extra.pop("tools", None)
        plain_messages = [_message(message) for message in messages]
    except RecursionError:
        raise InvalidRequestError("the messages are nested too deeply", "messages") from None
    _check_list_of_objects(tools, "tools")
    _check_list_of_objects(documents, "documents")
    specials = dict(getattr(tokenizer, "special_tokens_map", None) or {})
    return {**specials, **extra, "messages": plain_messages, "tools": tools,
            "documents": documents, "add_generation_prompt": add_generation_prompt}


def _message(message: Any) -> dict[str, Any]:
    """A message as a fresh plain dict: None values dropped, reasoning under all its names."""
    if not isinstance(message, Mapping):
        raise InvalidRequestError("each message must be an object", "messages")
    plain = _plain({key: value for key, value in message.items() if value is not None})
    reasoning = next((plain[key] for key in _REASONING_FIELDS if plain.get(key) is not None),
                     None)
    if reasoning is None:
        return plain
    return {"thinking": reasoning, **plain, "reasoning_content": reasoning}


def _plain(value: Any) -> Any:
    """A copy made of plain JSON-like types only, so the template never meets rich objects
    (whose methods the sandbox does not know to be harmful); others become "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _check_list_of_objects(value: Any, param: str) -> None:
    if value is not None and not (isinstance(value, list)
                                  and all(isinstance(item, dict) for item in value)):
        raise InvalidRequestError(f"{param} must be a list of objects", param)


def _size_param(variables: Mapping[str, Any]) -> str:
    """Whom to blame for an oversized render: the inputs when they alone fill half the cap."""
    inputs = [variables["messages"], variables["tools"], variables["documents"]]
    return "messages" if 2 * _text_chars(inputs) > MAX_RENDERED_CHARS else "chat_template"


def _text_chars(value: Any) -> int:
    """Characters in all the strings inside ``value`` (keys included)."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


# ---- continue_final_message ------------------------------------------------------------------


def _mark_final_message(messages: list[dict[str, Any]]) -> str:
    """Tag the end of the final message's text (the messages are our own copies); return
    that text untagged."""
    last = messages[-1]
    content = last.get("content")
    if isinstance(content, str):
        last["content"] = content + _CONTINUE_TAG
        return content
    for block in reversed(content if isinstance(content, list) else []):
        if isinstance(block, dict) and isinstance(block.get("text"), str):
            text = block["text"]
            block["text"] = text + _CONTINUE_TAG
            return text
    raise InvalidRequestError("continue_final_message needs text in the final message",
                              "messages")


def _cut_at_tag(text: str, final_text: str) -> str:
    """The render cut right after the final message's text (where the tag sits)."""
    tag = _CONTINUE_TAG.strip()
    if tag not in text or final_text.strip() not in text:
        raise InvalidRequestError("continue_final_message is set but the chat template does not "
                                  "keep the final message as it is", "messages")
    at = text.rindex(tag)
    return text[:at] if text.startswith(_CONTINUE_TAG, at) else text[:at].rstrip()
