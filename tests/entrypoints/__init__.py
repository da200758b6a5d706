"""Tests of the network entrypoints."""
