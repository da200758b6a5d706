"""The single-stream figures computed from streamed output stamps (no GPU needed)."""

import pytest

from pagoda.bench.gpu_figures import decode_gaps


def test_decode_gaps_mean_median_and_max():
    # outputs after the first at 10 ms a token, one step of 50 ms, one output of two tokens
    stamps = [(0.0, 1), (0.010, 2), (0.020, 3), (0.070, 4), (0.090, 6), (0.100, 7)]
    gaps = decode_gaps(stamps)
    assert gaps["tpot_s"] == pytest.approx(0.100 / 6)
    assert gaps["tpot_median_s"] == pytest.approx(0.010)
    assert gaps["tpot_max_s"] == pytest.approx(0.050)


def test_decode_gaps_of_one_output_are_zero():
    assert decode_gaps([(0.5, 1)]) == {"tpot_s": 0.0, "tpot_median_s": 0.0, "tpot_max_s": 0.0}
