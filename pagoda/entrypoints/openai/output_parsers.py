"""Which tool-call and reasoning formats a server parses: the operator's choice, or what the
model's chat template implies."""

from __future__ import annotations

from dataclasses import dataclass

from pagoda.entrypoints.openai.reasoning_parsers import (
    REASONING_PARSERS,
    ReasoningParser,
    detect_reasoning_parser,
)
from pagoda.entrypoints.openai.tool_parsers import (
    TOOL_PARSERS,
    ToolParser,
    detect_tool_parser,
)
from pagoda.logger import get_logger

logger = get_logger(__name__)

AUTO = "auto"
NONE = "none"
DEFAULT_TOOL_PARSER = "hermes"  # the most common format, when the template names none
TOOL_PARSER_CHOICES = (AUTO, *TOOL_PARSERS)
REASONING_PARSER_CHOICES = (AUTO, NONE, *REASONING_PARSERS)


def check_parser_names(tool_parser: str | None, reasoning_parser: str | None) -> None:
    """Refuse unknown format names before the server starts."""
    from pagoda.errors import ConfigError
    if tool_parser not in (None, *TOOL_PARSER_CHOICES):
        raise ConfigError(f"unknown --tool-call-parser {tool_parser!r}; choose from "
                          f"{', '.join(TOOL_PARSER_CHOICES)}")
    if reasoning_parser not in (None, *REASONING_PARSER_CHOICES):
        raise ConfigError(f"unknown --reasoning-parser {reasoning_parser!r}; choose from "
                          f"{', '.join(REASONING_PARSER_CHOICES)}")


TOOLS_NOT_RENDERED = ("the chat template does not render tools: a request's tools never "
                      "reach the prompt, so tool_choice auto rarely calls one (required and "
                      "named choices are still enforced by grammar); give a tool-aware "
                      "template with --chat-template")
# the response header that says so, on chat responses to requests with tools
TOOLS_WARNING_HEADER = "x-pagoda-warning"
TOOLS_WARNING = "the chat template does not render tools; they did not reach the prompt"


@dataclass(slots=True)
class OutputParsers:
    tools: ToolParser | None
    reasoning: ReasoningParser | None
    renders_tools: bool = True  # whether the chat template puts tools into the prompt

    @classmethod
    def resolve(cls, tool_parser: str | None, reasoning_parser: str | None,
                template: str | None, renders_tools: bool = True) -> OutputParsers:
        """`auto` (or None) detects from the chat template: tools fall back to hermes,
        reasoning to no splitting; `none` turns reasoning splitting off. A template that
        does not render tools is warned about here (once per model)."""
        tool_name = tool_parser if tool_parser not in (None, AUTO) else (
            detect_tool_parser(template) or DEFAULT_TOOL_PARSER)
        reasoning_name = reasoning_parser if reasoning_parser not in (None, AUTO) else \
            detect_reasoning_parser(template)
        if reasoning_name == NONE:
            reasoning_name = None
        logger.info("tool-call format: %s; reasoning format: %s", tool_name,
                    reasoning_name or "none")
        if not renders_tools:
            logger.warning(TOOLS_NOT_RENDERED)
        reasoning = REASONING_PARSERS[reasoning_name]() if reasoning_name else None
        return cls(TOOL_PARSERS[tool_name](), reasoning, renders_tools)
