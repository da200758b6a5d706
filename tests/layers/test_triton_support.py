"""What Triton compiles per CUDA compute capability."""

from pagoda.layers.triton_support import has_e4m3


def test_e4m3_from_compute_capability_8_9_and_in_the_interpreter():
    assert not has_e4m3((8, 0)) and not has_e4m3((8, 6))  # A100, A10
    assert has_e4m3((8, 9)) and has_e4m3((9, 0)) and has_e4m3((10, 0))  # L40S, H100, B200
    assert has_e4m3(None)  # the CPU interpreter
