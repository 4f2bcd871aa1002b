"""evaluate.py: the circle detector on rendered circles and the histogram sanity values of EXPERIMENTS.md §5.3."""
import math

import numpy as np
import pytest

from data import render_circles
from evaluate import circle_metrics, detect_circles, divergence_to_uniform, histogram, uniformity_report


def test_detector_finds_known_centres_and_counts():
    images = render_circles([np.array([[10, 7]]), np.zeros((0, 2)), np.array([[5, 5], [25, 20]]),
                             np.array([[16, 16]])], 32)
    found = detect_circles(images)
    assert [n for n, _ in found] == [1, 0, 2, 1]
    np.testing.assert_allclose(found[0][1][0], [10, 7], atol=1e-6)
    np.testing.assert_allclose(sorted(found[2][1][:, 0]), [5, 25], atol=1e-6)


def test_circle_metrics():
    images = render_circles([np.array([[16, 10]]), np.array([[3, 10]]), np.zeros((0, 2)),
                             np.array([[5, 5], [25, 20]]), np.array([[7, 8]])], 32)
    m = circle_metrics(images)
    # middle = x/W in [0.2, 0.8]: 16/32 yes, 3/32 no, 7/32 = 0.219 yes
    assert m["accuracy"] == pytest.approx(2 / 5)
    assert m["zero_circles"] == pytest.approx(1 / 5) and m["multi_circles"] == pytest.approx(1 / 5)
    assert m["invalid"] == pytest.approx(2 / 5)


def test_sanity_values_of_the_paper_metrics():
    assert divergence_to_uniform(np.full(100, 0.01)) == pytest.approx((0.0, 0.0), abs=1e-12)
    two = np.zeros(100); two[[3, 70]] = 0.5
    kld, l2 = divergence_to_uniform(two)
    assert kld == pytest.approx(math.log(50)) and l2 == pytest.approx(0.7)
    one = np.zeros(100); one[0] = 1
    kld, l2 = divergence_to_uniform(one)
    assert kld == pytest.approx(math.log(100)) and l2 == pytest.approx(0.995, abs=5e-4)


def test_paper_exact_bins_follow_the_sample_range():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.4, 0.6, 100000)           # uniform on a sub-range
    paper = uniformity_report(p)
    assert paper["kld_paper"] < 0.01           # bins over [min, max]: looks uniform
    assert paper["kld_01"] == pytest.approx(math.log(5), abs=0.01)   # bins over [0, 1]: 20 of 100 bins
    assert histogram(p, paper_exact=False).sum() == pytest.approx(1.0)
