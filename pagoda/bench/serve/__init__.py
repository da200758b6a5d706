"""`pagoda bench serve`: an online serving benchmark for any OpenAI-compatible server."""
