"""pagoda.cli."""
