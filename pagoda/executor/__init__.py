"""pagoda.executor."""
