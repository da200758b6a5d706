"""What a request asks its output to follow (vLLM's `structured_outputs` fields)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pagoda.errors import InvalidRequestError

MAX_SPEC_CHARS = 256 << 10  # a schema, regex or grammar as text
MAX_CHOICES = 1024
MAX_CHOICE_CHARS = 4096


@dataclass(slots=True)
class StructuredOutputsParams:
    """Exactly one constraint: a JSON schema (as JSON text), any JSON object, a regex, one of
    several literal strings, or an EBNF grammar (GBNF dialect)."""

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] = field(default_factory=list)
    grammar: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def kind(self) -> str:
        for name in ("json", "regex", "grammar"):
            if getattr(self, name) is not None:
                return name
        return "choice" if self.choice else "json_object"

    def validate(self) -> None:
        given = [name for name in ("json", "regex", "grammar") if getattr(self, name) is not None]
        given += ["choice"] * bool(self.choice) + ["json_object"] * bool(self.json_object)
        if len(given) != 1:
            raise InvalidRequestError("structured outputs take exactly one of json, json_object, "
                                      f"regex, choice or grammar (got {given or 'none'})",
                                      "structured_outputs")
        for name in ("json", "regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value
                                      or len(value) > MAX_SPEC_CHARS):
                raise InvalidRequestError(f"structured outputs {name} must be a non-empty string "
                                          f"of at most {MAX_SPEC_CHARS} characters",
                                          "structured_outputs")
        self._validate_choice()
        if self.json is not None:
            self._validate_schema_text()

    def _validate_choice(self) -> None:
        if len(self.choice) > MAX_CHOICES:
            raise InvalidRequestError(f"at most {MAX_CHOICES} choices are allowed",
                                      "structured_outputs")
        for option in self.choice:
            if not isinstance(option, str) or not option or len(option) > MAX_CHOICE_CHARS:
                raise InvalidRequestError("choices must be non-empty strings of at most "
                                          f"{MAX_CHOICE_CHARS} characters", "structured_outputs")

    def _validate_schema_text(self) -> None:
        try:
            schema = json.loads(self.json)
        except (json.JSONDecodeError, RecursionError):
            raise InvalidRequestError("the JSON schema is not valid JSON",
                                      "structured_outputs") from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequestError("a JSON schema must be an object", "structured_outputs")


def choice_grammar(options: list[str]) -> str:
    """An EBNF grammar whose only sentences are the given strings."""
    return "root ::= " + " | ".join(_ebnf_literal(o) for o in options)


def _ebnf_literal(text: str) -> str:
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)
