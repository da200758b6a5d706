"""Anthropic's Messages API (/v1/messages) over pagoda's engine, templates and parsers."""
