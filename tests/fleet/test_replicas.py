"""Replica routing: the replica that saw a prompt's prefix gets it, unless it is much busier
than the least-loaded one."""

from __future__ import annotations

from pagoda.fleet.replicas import PrefixIndex, ReplicaSet, prefix_hashes


class Engine:
    """What ReplicaSet.choose reads of an AsyncEngine: its load (and model facts)."""

    def __init__(self, in_flight: int = 0) -> None:
        self.num_in_flight = in_flight
        self.tokenizer = self.model_info = self.input_processor = None


def replica_set(*loads: int, slack: int = 8) -> ReplicaSet:
    return ReplicaSet([Engine(n) for n in loads], [PrefixIndex() for _ in loads], slack)


def test_prefix_hashes_chain_whole_blocks():
    a = prefix_hashes(list(range(40)))
    b = prefix_hashes(list(range(32)) + [7] * 8)
    assert len(a) == 2 and a == b  # only full blocks count; the tail differs past them
    assert prefix_hashes([1] * 16 + list(range(16)))[1] != prefix_hashes(list(range(32)))[1]


def test_a_shared_prefix_goes_back_to_the_same_replica():
    replicas = replica_set(0, 0, 0)
    system = list(range(1000, 1064))
    first = replicas.choose(system + [1, 2, 3])
    replicas.engines[first].num_in_flight = 3  # now the busiest
    assert replicas.choose(system + [4, 5, 6]) == first


def test_without_a_known_prefix_the_least_loaded_replica_wins():
    replicas = replica_set(5, 1, 3)
    assert replicas.choose(list(range(64))) == 1


def test_a_much_busier_prefix_holder_loses_to_the_least_loaded():
    replicas = replica_set(0, 0, slack=4)
    prompt = list(range(64))
    holder = replicas.choose(prompt)
    replicas.engines[holder].num_in_flight = 10
    assert replicas.choose(prompt) == 1 - holder
    assert replicas.indexes[1 - holder].matched_blocks(prefix_hashes(prompt)) == 4


def test_the_prefix_index_is_bounded():
    index = PrefixIndex(capacity=3)
    index.remember([1, 2, 3, 4])
    assert index.matched_blocks([1]) == 0 and index.matched_blocks([2, 3, 4]) == 3
