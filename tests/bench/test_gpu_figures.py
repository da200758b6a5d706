"""The single-stream figures computed from streamed output stamps (no GPU needed)."""

import pytest

from pagoda.bench.gpu_figures import ceilings_of, decode_gaps
from pagoda.bench.roofline import Ceilings


def test_decode_gaps_mean_median_and_max():
    # outputs after the first at 10 ms a token, one step of 50 ms, one output of two tokens
    stamps = [(0.0, 1), (0.010, 2), (0.020, 3), (0.070, 4), (0.090, 6), (0.100, 7)]
    gaps = decode_gaps(stamps)
    assert gaps["tpot_s"] == pytest.approx(0.100 / 6)
    assert gaps["tpot_median_s"] == pytest.approx(0.010)
    assert gaps["tpot_max_s"] == pytest.approx(0.050)


def test_decode_gaps_of_one_output_are_zero():
    assert decode_gaps([(0.5, 1)]) == {"tpot_s": 0.0, "tpot_median_s": 0.0, "tpot_max_s": 0.0}


@pytest.mark.parametrize("float8_tflops", [None, 1450.0])
def test_the_ceilings_bounds_recorded_read_back(float8_tflops):
    """The throughput bench's floors of each system take the ceilings `bounds` measured, read
    back from its figures (a float8 rate only where one was measured)."""
    found = {"device": "H200", "bandwidth_gb_s": 3820.0, "matmul_tflops": 679.0,
             "float8_matmul_tflops": float8_tflops}
    ceilings = ceilings_of(found)
    assert ceilings == Ceilings("H200", pytest.approx(3820e9), pytest.approx(679e12),
                                None if float8_tflops is None else pytest.approx(1450e12))
