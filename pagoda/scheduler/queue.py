"""Waiting queue ordered by (priority, arrival): FCFS when every priority is equal."""

from __future__ import annotations

import heapq

from pagoda.request import Request


class WaitingQueue:
    """A heap of waiting requests; preempted requests keep their place by arrival."""

    def __init__(self) -> None:
        self._heap: list[tuple[tuple[int, int], Request]] = []

    def __len__(self) -> int:
        return len(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)

    def __iter__(self):
        return (req for _, req in sorted(self._heap, key=lambda e: e[0]))

    def push(self, request: Request) -> None:
        heapq.heappush(self._heap, (request.sort_key, request))

    def peek(self) -> Request:
        return self._heap[0][1]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[1]

    def remove(self, request: Request) -> bool:
        for i, (_, req) in enumerate(self._heap):
            if req is request:
                self._heap[i] = self._heap[-1]
                self._heap.pop()
                heapq.heapify(self._heap)
                return True
        return False
