"""pagoda.layers.attention."""
