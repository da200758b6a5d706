"""pagoda.kv_cache."""
