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
    assert [n for n, _, _ in found] == [1, 0, 2, 1]
    assert found[0][2][0] == 21                      # the PIL radius-2 disc: 5x5 without the corners
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


def test_grain_smaller_than_min_area_is_not_a_circle():
    images = render_circles([np.array([[16, 10]]), np.array([[4, 10]])], 32)
    images[0, 3, 3] = 255                                # one bright pixel of sampling grain
    images[1, 20:22, 28] = 200                           # a 2-pixel speck
    m = circle_metrics(images)
    assert m["invalid"] == 0 and m["accuracy"] == pytest.approx(1 / 2)
    assert m["invalid_any_size"] == 1 and m["accuracy_any_size"] == 0
    assert [n for n, _, _ in detect_circles(images, min_area=1)] == [2, 2]


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


def test_frechet_distance_of_known_gaussians():
    from evaluate import fid, frechet_distance
    rng = np.random.default_rng(0)
    # diagonal covariances: FD = |mu1 - mu2|^2 + sum (s1 - s2)^2 (s = standard deviations)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    s1, s2 = rng.uniform(0.5, 2, 4), rng.uniform(0.5, 2, 4)
    expected = ((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    assert frechet_distance(mu1, np.diag(s1 ** 2), mu2, np.diag(s2 ** 2)) == pytest.approx(expected, rel=1e-9)
    # a common rotation leaves it unchanged; identical Gaussians are at distance 0
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    rot = frechet_distance(q @ mu1, q @ np.diag(s1 ** 2) @ q.T, q @ mu2, q @ np.diag(s2 ** 2) @ q.T)
    assert rot == pytest.approx(expected, rel=1e-6)
    a = rng.normal(size=(4, 4)); cov = a @ a.T
    assert frechet_distance(mu1, cov, mu1, cov) == pytest.approx(0, abs=1e-8)
    # from samples
    x = mu1 + rng.normal(size=(40000, 4)) * s1
    y = mu2 + rng.normal(size=(40000, 4)) * s2
    assert fid(x, y) == pytest.approx(expected, rel=0.03)


def test_precision_recall_and_nearest_neighbours():
    from evaluate import cosine_nearest, precision_recall
    rng = np.random.default_rng(1)
    real = rng.normal(size=(400, 2))
    p, r = precision_recall(real, rng.normal(size=(400, 2)))
    assert p > 0.9 and r > 0.9                                   # same distribution
    p, r = precision_recall(real, rng.normal(size=(400, 2)) + 20)
    assert p == 0 and r == 0                                     # disjoint
    p, r = precision_recall(real, 0.1 * rng.normal(size=(400, 2)))
    assert p > 0.95 and r < 0.3                                  # collapsed onto one mode: precise, no recall
    train = rng.normal(size=(50, 8))
    idx, dist = cosine_nearest(train[[7, 3]] * 2.0, train)       # scaled copies: cosine distance 0
    assert list(idx) == [7, 3] and np.allclose(dist, 0, atol=1e-12)
    idx, dist = cosine_nearest(train, train, exclude_self=True)
    assert (idx != np.arange(50)).all() and (dist > 0).all()
