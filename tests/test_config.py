"""ParallelConfig's executor backend: `uni` for one rank and `mp` for more unless one is
named; `ray` only when asked for; anything else refused with the list. CacheConfig's size
given as a string."""

from __future__ import annotations

import pytest

from pagoda.config import CacheConfig, ParallelConfig
from pagoda.errors import ConfigError


@pytest.mark.parametrize("tp, pp, asked, resolved", [
    (1, 1, "auto", "uni"), (2, 1, "auto", "mp"), (1, 2, "auto", "mp"),
    (2, 1, "ray", "ray"), (1, 1, "ray", "ray"), (2, 2, "mp", "mp")])
def test_the_backend_resolves(tp, pp, asked, resolved):
    config = ParallelConfig(tp, pp, asked)
    assert config.backend == resolved and config.world_size == tp * pp


def test_an_unknown_backend_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="must be one of auto, uni, mp, ray$"):
        ParallelConfig(2, 1, "slurm")
    with pytest.raises(ConfigError, match="'uni' runs one worker"):
        ParallelConfig(2, 1, "uni")


def test_the_kv_cache_size_may_be_given_as_a_size_string():
    """As on the command line (--kv-cache-memory 512MiB): LLM(kv_cache_memory="512MiB")."""
    assert CacheConfig(kv_cache_memory="512MiB").kv_cache_memory == 512 << 20
    assert CacheConfig(kv_cache_memory=1024).kv_cache_memory == 1024
    with pytest.raises(ConfigError, match="bytes or a size like '512MiB', got 'lots'"):
        CacheConfig(kv_cache_memory="lots")
    with pytest.raises(ConfigError, match="must be positive"):
        CacheConfig(kv_cache_memory="0MiB")
