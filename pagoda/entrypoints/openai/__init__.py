"""The OpenAI-compatible API: protocol models, error envelope, application and routes."""
