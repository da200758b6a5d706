"""CPU time of the API process's output processing per streamed token: 32 requests with
SmolLM2's tokenizer, one token each an engine step, for outputs of a given length (its text
and token list are kept whole for every step's snapshot, so long outputs cost more a token).

    python bench/cpu/output_processor_cost.py [TOKENS_PER_REQUEST ...]   (default 256 4096)
"""

from __future__ import annotations

import random
import sys
import time

from transformers import AutoTokenizer

from pagoda.core_outputs import EngineCoreOutput
from pagoda.engine.output_processor import OutputProcessor
from pagoda.models import store
from pagoda.sampling_params import SamplingParams

REQUESTS = 32


def microseconds_per_token(tokenizer, tokens: int) -> float:
    processor = OutputProcessor(tokenizer)
    for r in range(REQUESTS):
        processor.add_request(f"r{r}", None, [1, 2, 3],
                              [(f"r{r}-0", SamplingParams(max_tokens=tokens, ignore_eos=True))])
    rng = random.Random(0)
    start = time.perf_counter()
    for step in range(tokens):
        finish = "length" if step == tokens - 1 else None
        processor.process([EngineCoreOutput(f"r{r}-0", [rng.randrange(100, 20000)],
                                            finish_reason=finish) for r in range(REQUESTS)])
    return (time.perf_counter() - start) / (REQUESTS * tokens) * 1e6


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(store.find_pulled("smollm2")))
    for tokens in [int(a) for a in sys.argv[1:]] or [256, 4096]:
        print(f"{tokens} tokens a request: "
              f"{microseconds_per_token(tokenizer, tokens):.1f} us a token")


if __name__ == "__main__":
    main()
