"""Mixture-of-experts: the router's top-k selection, the fused expert layer (stacked expert
weights, a grouped-GEMM Triton path on GPU and a pure-torch path that is the CPU path and
the reference)."""
