"""Structured output: grammars (JSON schema, regex, choice, EBNF) that constrain sampling.

The frontend compiles a request's grammar once, off the event loop and under a time limit,
so a bad or too costly spec is refused with a 400 before admission (`GrammarCompiler`). The
engine compiles it again in a background thread (xgrammar's bounded cache usually answers at
once), keeps the request out of the batch until its matcher is ready, then masks the request's
logits row each step and advances the matcher with each sampled token (`GrammarMatcherState`).
"""
