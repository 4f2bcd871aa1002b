"""evaluate.py: the circle detector on rendered circles and the histogram sanity values of docs/paper_notes.md §5.3."""
import math

import numpy as np
import pytest
import torch

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
    from appendix.quality import fid, frechet_distance
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
    from appendix.quality import cosine_nearest, precision_recall
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


class RightwardClassifier(torch.nn.Module):
    """A fake circles classifier: logits (0, s) with s = (x - W/2)/2 + (y - W/2)/8 for the centroid (x, y) of the
    image's bright pixels, so p(class 1 = right) = sigmoid(s) is known at every circle position (and is not
    symmetric in x and y, so a transposed map shows). Records the timesteps it is given."""

    def __init__(self):
        super().__init__()
        self.seen_t = []

    def forward(self, x, t):
        self.seen_t.append(t.clone())
        w = (x[:, 0] + 1) / 2                                   # [N, H, W], 1 on the disc, 0 elsewhere
        ar = torch.arange(x.shape[-1], dtype=x.dtype)
        cx = (w * ar).sum((1, 2)) / w.sum((1, 2))
        cy = (w * ar[:, None]).sum((1, 2)) / w.sum((1, 2))
        s = (cx - x.shape[-1] / 2) / 2 + (cy - x.shape[-1] / 2) / 8
        return torch.stack([torch.zeros_like(s), s], dim=1)


def expected_right_map(size, radius):
    """[y, x] grid of sigmoid(s) at the integer centres radius..size-radius-1 (the disc's centroid is its centre)."""
    c = np.arange(radius, size - radius, dtype=np.float64)
    s = (c[None, :] - size / 2) / 2 + (c[:, None] - size / 2) / 8
    return 1 / (1 + np.exp(-s))


def test_classifier_heatmap_shows_p_right_with_rows_y_and_columns_x():
    from evaluate import classifier_heatmap
    clf = RightwardClassifier()
    heat, coords = classifier_heatmap(clf, 16, radius=2, batch_size=50)
    assert coords.tolist() == list(range(2, 14))
    np.testing.assert_allclose(heat, expected_right_map(16, 2), rtol=1e-5, atol=1e-6)
    t = torch.cat(clf.seen_t)
    assert len(t) == 144 and t.dtype == torch.long and (t == 0).all()


def test_sample_heatmaps_plot_p_right_of_each_classifier(tmp_path, monkeypatch):
    """sample.py's figure (titled p(right)) gets p(class 1) of the run's classifier on the full grid."""
    import evaluate
    from data import circles_dataset
    (tmp_path / "classifier.pt").touch()
    monkeypatch.setattr(evaluate.ckpt_io, "load_classifier", lambda path, device: (RightwardClassifier(), {}))
    drawn = {}
    monkeypatch.setattr(evaluate, "plot_heatmaps", lambda maps, coords, path, size: drawn.update(maps=maps, coords=coords))
    monkeypatch.setattr(evaluate, "plot_histograms", lambda *a, **k: None)
    data_config = dict(image_size=16, radius=2, delta=0.2, seed=42)
    samples = circles_dataset(16)[0][:4]
    evaluate.circles_pictures(samples, np.array([0.1, 0.9]), "guided", data_config, tmp_path, tmp_path, [], "cpu")
    assert list(drawn["maps"]) == ["classifier"] and drawn["coords"].tolist() == list(range(2, 14))
    np.testing.assert_allclose(drawn["maps"]["classifier"], expected_right_map(16, 2), rtol=1e-5, atol=1e-6)


def test_detector_threshold_min_area_and_8_connectivity_by_hand():
    """Grey > 127 is bright; a blob of exactly min_area = 5 pixels counts, one of 4 does not; two 3-pixel runs
    touching at a corner are one 8-connected blob. Centroids are (x, y) means of the pixel positions."""
    img = np.zeros((12, 12), np.uint8)
    img[0:2, 0:3] = 128                      # 6 px, centre (1, 0.5)
    img[0:2, 6:9] = 127                      # not above the threshold
    img[5, 0:5] = 255                        # exactly 5 px, centre (2, 5)
    img[8, 0:4] = 255                        # 4 px: grain
    img[10, 6:9] = 255                       # 3 px ...
    img[11, 9:12] = 255                      # ... + 3 px touching diagonally: one blob, centre (8.5, 10.5)
    [(n, centres, areas)] = detect_circles(img[None])
    assert n == 3 and areas.tolist() == [6, 5, 6]
    np.testing.assert_allclose(centres, [[1, 0.5], [2, 5], [8.5, 10.5]], atol=1e-9)
    assert detect_circles(img[None], threshold=126)[0][0] == 4 and detect_circles(img[None], min_area=6)[0][0] == 2
    rgb = np.repeat(img[:, :, None], 3, axis=2)
    rgb[0:2, 0:3] = (255, 0, 0)              # pure red: grey 0.299 · 255 = 76, dark
    assert detect_circles(rgb[None])[0][0] == 2


def test_a_blank_or_all_white_sample_holds_no_circle():
    """An all-white image is one component spanning the width, centroid x/W = 0.5: it used to count as one circle in
    the middle. Now it holds none (like an all-black one); a full-width bar is ignored beside a real disc."""
    white, black = np.full((32, 32, 3), 255, np.uint8), np.zeros((32, 32, 3), np.uint8)
    bar = render_circles(np.array([[16, 8]]), 32)[0]
    bar[25:27, :] = 255                                              # a 2-px bar across the whole width
    found = detect_circles(np.stack([white, black, bar]))
    assert [n for n, _, _ in found] == [0, 0, 1]
    np.testing.assert_allclose(found[2][1], [[16, 8]], atol=1e-9)
    m = circle_metrics(np.stack([white, black, white]))
    assert m["accuracy"] == 0 and m["zero_circles"] == 1 and m["invalid"] == 1 and len(m["x"]) == 0
    assert m["accuracy_any_size"] == 0 and m["invalid_any_size"] == 1


def test_circle_metrics_middle_is_inclusive_and_reports_x():
    """W = 40: centres x = 8, 32 are x/W = 0.2, 0.8 (in the middle, both ends included); 7, 33 are not."""
    images = render_circles(np.array([[8, 20], [32, 20], [7, 20], [33, 20]]), 40)
    m = circle_metrics(images)
    assert m["n"] == 4 and m["accuracy"] == 0.5 and m["invalid"] == 0 and m["zero_circles"] == 0
    np.testing.assert_allclose(m["x"], [0.2, 0.8, 7 / 40, 33 / 40], atol=1e-12)
    assert circle_metrics(images, middle=(0.1, 0.5))["accuracy"] == 0.5            # x/W = 0.2 and 0.175
    big = circle_metrics(images, min_area=22)                                     # the disc has 21 pixels
    assert big["zero_circles"] == 1 and big["invalid"] == 1 and big["accuracy"] == 0
    assert big["accuracy_any_size"] == 0.5 and big["invalid_any_size"] == 0


def test_histogram_ranges_and_uniformity_report_by_hand():
    v = [0.5, 0.55, 0.6, 0.9]
    # [min, max] = [0.5, 0.9] in 2 bins: [0.5, 0.7), [0.7, 0.9]; [0, 1] in 2 bins: [0, 0.5), [0.5, 1]
    np.testing.assert_allclose(histogram(v, bins=2), [0.75, 0.25])
    np.testing.assert_allclose(histogram(v, bins=2, paper_exact=False), [0.0, 1.0])
    assert len(histogram(v)) == 100 and histogram(v)[[0, 12, 25, 99]].tolist() == [0.25] * 4   # bins of 0.004
    np.testing.assert_allclose(histogram([0.3, 0.3], bins=3), [0, 1, 0])   # constant: bins over [-0.2, 0.8]
    r = uniformity_report(v, bins=2)
    assert r["kld_paper"] == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert r["mse_paper"] == pytest.approx(math.sqrt(2 * 0.25 ** 2))
    assert r["kld_01"] == pytest.approx(math.log(2)) and r["l2_01"] == pytest.approx(math.sqrt(0.5))
    assert set(r) == {"kld_paper", "mse_paper", "kld_01", "l2_01"}


def test_log_count_heatmap_by_hand():
    from evaluate import log_count_heatmap
    px = [0, 0, 0, 0.5, 1, 1, 0.49]
    py = [0, 0, 0, 0, 1, 1, 0.99]
    # bins of 1/2, p = 1 in the last bin: counts [[3, 1], [1, 2]] (row = p_y bin); ln 1 = 0 like an empty bin
    np.testing.assert_allclose(log_count_heatmap(px, py, bins=2), [[math.log(3), 0], [0, math.log(2)]])
    h = log_count_heatmap([0.05, 0.05, 0.999999], [0.0, 0.0, 1.0])
    assert h.shape == (20, 20) and h[0, 1] == pytest.approx(math.log(2)) and h.sum() == pytest.approx(math.log(2))


def test_precision_recall_k_nearest_balls_by_hand():
    """1-D, k = 3: real 0, 1, 2, 3, 10 have squared 3rd-neighbour radii 9, 4, 4, 9, 81. A fake at 19 is on the
    ball of 10 (81 <= 81), -3 on the ball of 0 (9 <= 9); 19.5 and -3.5 are outside. Every real point is inside the
    wide balls of the fakes."""
    from appendix.quality import precision_recall
    real = np.array([[0.0], [1], [2], [3], [10]])
    fake = np.array([[19.0], [19.5], [-3], [-3.5]])
    assert precision_recall(real, fake) == (0.5, 1.0)
    assert precision_recall(real, fake, k=2)[0] == 0.0          # radii 4, 1, 1, 4, 64


def test_sqrt_psd_symmetrises_and_drops_negative_eigenvalues():
    from appendix.quality import _sqrt_psd
    np.testing.assert_allclose(_sqrt_psd(np.diag([4.0, -1.0])), np.diag([2.0, 0.0]), atol=1e-12)
    m = np.array([[4.0, 2.0], [0.0, 9.0]])                       # its symmetric part [[4, 1], [1, 9]]
    s = _sqrt_psd(m)
    np.testing.assert_allclose(s, s.T, atol=1e-12)
    np.testing.assert_allclose(s @ s, [[4, 1], [1, 9]], atol=1e-12)
    assert np.linalg.eigvalsh(s).min() > 0


def test_cosine_nearest_keeps_self_matches_unless_excluded_and_handles_zero_vectors():
    from appendix.quality import cosine_nearest
    refs = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    idx, dist = cosine_nearest(refs, refs)
    assert idx.tolist() == [0, 1, 2] and np.allclose(dist, 0, atol=1e-12)
    idx, dist = cosine_nearest(refs, refs, exclude_self=True)
    assert idx.tolist() == [2, 2, 0] and dist == pytest.approx([1 - math.sqrt(0.5)] * 3)
    idx, dist = cosine_nearest(np.zeros((1, 2)), refs)              # a zero query: cosine distance 1 to all
    assert idx.tolist() == [0] and dist.tolist() == [1.0]


def test_distances_are_computed_in_float64_from_float32_features():
    """Float32 features are promoted before any arithmetic: |a|² + |b|² - 2ab of 10000.5 and 10000.25 keeps its
    0.0625 (float32 squares round to multiples of 8), and a cosine distance of 5e-9 survives (float32 has 6e-8)."""
    from appendix.quality import _pairwise_sq, cosine_nearest
    a, b = np.array([[10000.5]], np.float32), np.array([[10000.25]], np.float32)
    assert _pairwise_sq(a, b).tolist() == [[0.0625]]
    _, dist = cosine_nearest(np.array([[1, 1e-4]], np.float32), np.array([[1, 2e-4]], np.float32))
    q, r = np.array([1, np.float32(1e-4)]), np.array([1, np.float32(2e-4)])      # the same values in float64
    assert dist[0] == pytest.approx(1 - q @ r / np.linalg.norm(q) / np.linalg.norm(r), rel=1e-6)
    kld, l2 = divergence_to_uniform(np.array([0.5, 0.5, 0.0, 0.0], np.float32))
    assert kld == pytest.approx(math.log(2), rel=1e-13) and l2 == pytest.approx(0.5, rel=1e-13)


def test_fid_and_frechet_distance_on_float32_and_rank_deficient_inputs():
    from appendix.quality import fid, frechet_distance
    rng = np.random.default_rng(0)
    x = (1e4 + rng.normal(size=(50, 2))).astype(np.float32)
    y = (1e4 + 2 * rng.normal(size=(50, 2))).astype(np.float32)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    expected = frechet_distance(x64.mean(0), np.cov(x64.T), y64.mean(0), np.cov(y64.T))   # features in columns
    assert fid(x, y) == pytest.approx(expected, rel=1e-9)
    v = np.random.default_rng(0).normal(size=(3, 1))
    singular = v @ v.T                   # rank 1: round-off gives a -3e-18 eigenvalue, clipped to 0 before the sqrt
    assert frechet_distance(np.zeros(3), singular, np.zeros(3), singular) == pytest.approx(0, abs=1e-7)   # not NaN


def test_fid_of_a_set_of_fewer_than_two_features_is_nan_and_constant_features_give_the_mean_distance():
    """One feature has no covariance (N - 1 = 0): NaN, not a LinAlgError from the NaN matrix; constant features
    have covariance 0, so FID is ||μ_a − μ_b||² (+ the other set's trace)."""
    from appendix.quality import fid
    x = np.random.default_rng(0).normal(size=(20, 3))
    assert np.isnan(fid(x[:1], x)) and np.isnan(fid(x, x[:1])) and np.isnan(fid(x[:0], x))
    assert fid(np.ones((5, 3)), np.zeros((7, 3))) == pytest.approx(3.0, abs=1e-12)
    assert fid(np.ones((5, 3)), x) == pytest.approx(((1 - x.mean(0)) ** 2).sum() + np.trace(np.cov(x.T)), rel=1e-9)


def test_classifier_heatmap_defaults_target_and_timestep():
    from evaluate import classifier_heatmap
    clf = RightwardClassifier()
    heat, coords = classifier_heatmap(clf, 12)                      # radius 2: centres 2..9
    assert coords.tolist() == list(range(2, 10))
    np.testing.assert_allclose(heat, expected_right_map(12, 2), rtol=1e-5, atol=1e-6)
    left, _ = classifier_heatmap(clf, 12, radius=3, t=7, target=0, batch_size=7)
    np.testing.assert_allclose(left, 1 - expected_right_map(12, 3), rtol=1e-5, atol=1e-6)
    assert (clf.seen_t[-1] == 7).all() and len(torch.cat(clf.seen_t[1:])) == 36


def test_host_line_by_hand():
    from evaluate import host_line
    cpu = dict(cpu="x86_64", cpu_flags=["avx2"], threads=2, amp="off", torch="2.13.0")
    assert host_line(cpu) == "x86_64 [avx2], 2 threads, AMP off, torch 2.13.0"
    gpu = dict(cpu_flags=[], gpu="NVIDIA H100 80GB HBM3", amp="float16", torch="2.11.0+cu130")
    assert host_line(gpu) == "NVIDIA H100 80GB HBM3, AMP float16, torch 2.11.0+cu130"
    assert host_line(None) == "not recorded"


def test_cosine_nearest_in_blocks_equals_the_whole_matrix():
    """The blocked search gives the argmin / min of the full cosine-distance matrix (numpy oracle), self excluded."""
    from appendix.quality import cosine_nearest
    rng = np.random.default_rng(3)
    refs, queries = rng.normal(size=(37, 5)), rng.normal(size=(23, 5))
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    full = 1 - unit(queries) @ unit(refs).T
    idx, dist = cosine_nearest(queries, refs, rows=4)
    assert idx.tolist() == full.argmin(1).tolist() and np.allclose(dist, full.min(1))
    own = 1 - unit(refs) @ unit(refs).T
    np.fill_diagonal(own, np.inf)
    idx, dist = cosine_nearest(refs, refs, exclude_self=True, rows=5)
    assert idx.tolist() == own.argmin(1).tolist() and np.allclose(dist, own.min(1))
