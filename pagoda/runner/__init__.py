"""pagoda.runner."""
