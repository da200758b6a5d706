"""pagoda.scheduler."""
