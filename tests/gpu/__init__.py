"""Tests that need a CUDA device (run on the lent GPU machine; skipped elsewhere)."""
