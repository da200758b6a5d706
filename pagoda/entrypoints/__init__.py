"""Network entrypoints: the OpenAI-compatible HTTP server and its helpers."""
