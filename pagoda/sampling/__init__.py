"""pagoda.sampling."""
