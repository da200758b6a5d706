"""Ollama's REST API (/api/*) over pagoda's engine, templates, parsers, fleet and model store."""
