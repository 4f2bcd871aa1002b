"""appendix/evaluator.py: App. D's top-k keeps the k most extreme examples per side, on hand-made scores."""
import numpy as np
import pytest
import torch

from appendix import evaluator
from appendix.evaluator import top_k_extremes

#            index:  0     1     2     3     4     5     6     7
P1 = np.array([0.10, 0.90, 0.30, 0.05, 0.60, 0.99, 0.40, 0.70])
LABELS = np.array([0, 1, 0, 0, 1, 1, 0, 1])


@pytest.mark.parametrize("k,kept", [
    (1, [3, 5]),                    # class 0: lowest p(class 1) is index 3 (0.05); class 1: highest is 5 (0.99)
    (2, [0, 1, 3, 5]),              # + index 0 (0.10) and index 1 (0.90)
    (3, [0, 1, 2, 3, 5, 7]),        # + index 2 (0.30) and index 7 (0.70)
    (4, [0, 1, 2, 3, 4, 5, 6, 7]),
])
def test_top_k_keeps_the_lowest_of_class_0_and_the_highest_of_class_1(k, kept):
    assert top_k_extremes(P1, LABELS, k).tolist() == kept


class Brightness(torch.nn.Module):
    """p(class 1 | image) = sigmoid(10 · mean pixel in [-1, 1]): brighter images are more 'class 1'."""

    def forward(self, x, t=None):
        s = 10 * x.mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(s), s], dim=1)


def test_extreme_filter_keeps_agreeing_examples_then_the_k_most_extreme_per_side(monkeypatch):
    values = np.array([10, 250, 60, 0, 200, 255, 100, 180, 30, 140])
    labels = np.array([0, 1, 0, 0, 1, 1, 0, 1, 1, 0])
    # 8 (value 30, label 1) and 9 (value 140, label 0) disagree with the brightness classifier: dropped
    images = np.broadcast_to(values[:, None, None, None], (10, 2, 2, 3)).astype(np.uint8)
    monkeypatch.setattr(evaluator, "train_clean_classifier", lambda *a, **k: (Brightness(), {}))
    out = evaluator.extreme_filter(images, labels, images, labels, Brightness(), sizes=[4, 6], tau1=0.5, tau2=0.5,
                                   members=2, log=lambda *a: None)
    assert out["counts"]["stage1_tau1"] == 8 and out["counts"]["stage2_ensemble_tau2"] == 8
    assert out["stage2"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert out["indices"][4].tolist() == [0, 1, 3, 5]           # darkest 0 (values 0, 10), brightest 1 (255, 250)
    assert out["indices"][6].tolist() == [0, 1, 2, 3, 4, 5]     # + value 60 (class 0) and value 200 (class 1)
    np.testing.assert_allclose(out["p1"], 1 / (1 + np.exp(-10 * (values[:8] / 127.5 - 1))), rtol=1e-5)


def test_top_k_breaks_ties_by_position():
    """Equal scores keep their train order (a stable sort), on more than 16 examples where numpy's default sort is not
    stable: the oracle is Python's stable sorted() on (score, position)."""
    p1 = np.random.default_rng(0).integers(0, 3, 100) / 2
    labels = np.random.default_rng(1).integers(0, 2, 100)
    idx0 = [i for i in range(100) if labels[i] == 0]
    idx1 = [i for i in range(100) if labels[i] == 1]
    low = sorted(idx0, key=lambda i: (p1[i], i))[:7]
    high = sorted(idx1, key=lambda i: (-p1[i], i))[:7]
    assert top_k_extremes(p1, labels, 7).tolist() == sorted(low + high)


def test_confident_agreement_needs_a_probability_strictly_above_tau():
    probs = torch.tensor([[0.5, 0.5], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    assert evaluator.confident_agreement(probs, np.array([0, 1, 1, 0]), 0.5).tolist() == [False, True, False, False]


def test_predict_probs_is_the_softmax_of_the_model_on_the_float_images():
    values = np.array([0, 100, 255, 30, 200])
    images = np.broadcast_to(values[:, None, None, None], (5, 2, 2, 3)).astype(np.uint8)
    probs = evaluator.predict_probs(Brightness(), images)                  # default batch and device
    s = 10 * (values / 127.5 - 1)
    np.testing.assert_allclose(probs.numpy(), np.stack([1 / (1 + np.exp(s)), 1 / (1 + np.exp(-s))], 1), rtol=1e-5)
    np.testing.assert_allclose(evaluator.predict_probs(Brightness(), images, batch_size=2).numpy(), probs.numpy())


@pytest.mark.parametrize("mirror", [False, True])
def test_extreme_filter_passes_its_data_seeds_and_device_and_caps_k_at_the_smaller_side(monkeypatch, mirror):
    """Default τ1 = 0.95, τ2 = 0.9999 and 5 members, with the brightness classifier: p(own label) is
    sigmoid(10 · |v / 127.5 - 1|) = 0.99995 at v = 0 or 255, 0.9998 at v = 20 or 235 (passes τ1 only),
    0.90 at v = 100 (fails τ1); index 8 disagrees with its label. The mirrored case swaps the classes, so once
    class 0 and once class 1 is the smaller side."""
    values = np.array([0, 5, 3, 20, 100, 255, 250, 235, 0])
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])
    if mirror:
        values, labels = 255 - values, 1 - labels
    images = np.broadcast_to(values[:, None, None, None], (9, 2, 2, 3)).astype(np.uint8)
    val_images, val_labels = images[:2].copy(), labels[:2].copy()
    calls, devices, logged = [], [], []

    def fake_train(imgs, labs, v_imgs, v_labs, **kwargs):
        calls.append((imgs, labs, v_imgs, v_labs, kwargs))
        return Brightness(), {}

    real_predict = evaluator.predict_probs

    def recording_predict(model, imgs, **kwargs):
        devices.append(kwargs.get("device"))
        return real_predict(model, imgs)

    monkeypatch.setattr(evaluator, "train_clean_classifier", fake_train)
    monkeypatch.setattr(evaluator, "predict_probs", recording_predict)
    out = evaluator.extreme_filter(images, labels, val_images, val_labels, Brightness(), sizes=[2, 10, 4],
                                   device="dev0", log=logged.append, steps=7)
    stage1 = np.array([0, 1, 2, 3, 5, 6, 7])
    folds = np.array_split(np.random.default_rng(0).permutation(stage1), 5)
    assert len(calls) == 6 and devices == ["dev0"] * 7
    for i, (imgs, labs, v_imgs, v_labs, kwargs) in enumerate(calls):
        rows = np.arange(9) if i == 0 else folds[i - 1]
        assert np.array_equal(imgs, images[rows]) and np.array_equal(labs, labels[rows])
        assert v_imgs is val_images and v_labs is val_labels
        assert kwargs == dict(seed=i, device="dev0", log=logged.append, steps=7)
    assert out["stage2"].tolist() == [0, 1, 2, 5, 6]
    assert list(out["indices"]) == [10, 4, 2]                              # largest first: nested sets
    assert out["indices"][10].tolist() == [0, 2, 5, 6] == out["indices"][4].tolist()   # k = 5 capped at 2
    assert out["indices"][2].tolist() == [0, 5]
    assert out["counts"] == dict(train=9, stage1_tau1=7, stage2_ensemble_tau2=5, top_k_10=4, top_k_4=4, top_k_2=2)
    assert logged == ["[filter] stage 1 (τ1 = 0.95): kept 7 of 9",
                      "[filter] stage 2 (5 members, τ2 = 0.9999): kept 5",
                      "[filter] size 10: only 2 per side survive; keeping 2 per side"]


def test_train_clean_classifier_keeps_the_best_validation_step_and_train_evaluator_calibrates():
    """Bright vs dark 8x8 images. Every eval_every-th step and the last are scored on the validation split; the
    returned eval-mode model is the best one, its accuracy the reported one (recomputed here with argmax)."""
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 8)
    images = (np.where(labels[:, None, None, None] == 1, 200, 40) + rng.integers(0, 30, (16, 8, 8, 3))).astype(np.uint8)
    val_labels = np.array([1, 0, 0, 1, 1, 0])
    val_images = images[[1, 0, 2, 3, 5, 4]]
    logged = []
    model, report = evaluator.train_clean_classifier(images, labels, val_images, val_labels, steps=5, batch_size=4,
                                                     width=4, eval_every=2, log=logged.append)
    assert not model.training and len(logged) == 3                      # steps 2, 4 and the last, 5
    assert [line.split()[2] for line in logged] == ["2/5", "4/5", "5/5"]
    assert report["step"] in (2, 4, 5) and set(report) == {"val_accuracy", "step"}
    with torch.no_grad():
        pred = model(evaluator.to_float(val_images)).argmax(1).numpy()
    assert report["val_accuracy"] == pytest.approx((pred == val_labels).mean())
    accs = [float(line.split("val acc ")[1].split()[0]) for line in logged]
    assert report["val_accuracy"] == pytest.approx(max(accs), abs=1e-4)
    assert report["step"] == [2, 4, 5][accs.index(max(accs))]           # the first step reaching the best
    model, report = evaluator.train_evaluator(images, labels, val_images, val_labels, steps=2, batch_size=4,
                                              width=4, log=lambda *a: None)
    assert {"val_accuracy", "step", "temperature", "ece_before", "ece_after", "nll_before", "nll_after"} <= set(report)
    assert model.temperature.item() == pytest.approx(report["temperature"]) and report["step"] == 2


class Shifted(Brightness):
    """Brightness with the decision point moved from mean 0 to mean `offset` (in [-1, 1] units)."""

    def __init__(self, offset):
        super().__init__()
        self.offset = offset

    def forward(self, x, t=None):
        return super().forward(x - self.offset)


def test_extreme_filter_needs_every_ensemble_member_to_agree(monkeypatch):
    """v = 180 (label 1) is bright enough for the brightness classifier but not for a member whose decision point is
    at mean 0.5 (v = 191): that first member's veto stands although the last member agrees."""
    values, labels = np.array([0, 255, 180, 20]), np.array([0, 1, 1, 0])
    images = np.broadcast_to(values[:, None, None, None], (4, 2, 2, 3)).astype(np.uint8)
    models = iter([Brightness(), Shifted(0.5), Brightness()])
    monkeypatch.setattr(evaluator, "train_clean_classifier", lambda *a, **k: (next(models), {}))
    out = evaluator.extreme_filter(images, labels, images, labels, Brightness(), sizes=[2], tau1=0.5, tau2=0.5,
                                   members=2, log=lambda *a: None)
    assert out["counts"]["stage1_tau1"] == 4 and out["stage2"].tolist() == [0, 1, 3]


def counting_batches(made, draws):
    """evaluator.Batches that records its constructor arguments (after images, labels) and every batch drawn."""
    class Counting(evaluator.Batches):
        def __init__(self, *args, **kwargs):
            made.append((args[2:], kwargs))
            super().__init__(*args, **kwargs)

        def __next__(self):
            draws.append(1)
            return super().__next__()

    return Counting


def test_train_clean_classifier_draws_flipped_batches_once_per_step_and_sizes_its_head(monkeypatch):
    """Three classes -> a 3-way head of the given width; one flipped, seeded minibatch per step (steps 1..steps)."""
    made, draws = [], []
    monkeypatch.setattr(evaluator, "Batches", counting_batches(made, draws))
    labels = np.array([0, 1, 2, 0, 1, 2])
    images = np.random.default_rng(0).integers(0, 256, (6, 4, 4, 3)).astype(np.uint8)
    logged = []
    model, report = evaluator.train_clean_classifier(images, labels, images, labels, steps=3, batch_size=2, width=4,
                                                     seed=7, eval_every=5, log=logged.append)
    assert made == [((2,), dict(flip="keep", seed=7))] and len(draws) == 3
    assert model.head[1].out_features == 3 and model.trunk[0].out_channels == 4
    assert len(logged) == 1 and logged[0].startswith("[evaluator] step 3/3 loss ")
    assert logged[0].endswith(f"val acc {report['val_accuracy']:.4f} (best {report['val_accuracy']:.4f} at 3)")
    binary = evaluator.train_clean_classifier(images[:2], labels[:2] * 0, images[:2], labels[:2] * 0, steps=1,
                                              batch_size=2, width=4, log=lambda *a: None)[0]
    assert binary.head[1].out_features == 2                        # at least 2 classes, even if one is seen


def test_train_clean_classifier_defaults_batch_64_and_adamw_1e3(monkeypatch):
    """With a linear stand-in for EvalNet (fast): 3 steps draw 3 batches of 64 and score the validation split once,
    at the last step (the default period is 250); AdamW gets lr 1e-3 and weight decay 1e-4."""
    made, draws, opts = [], [], []
    Counting = counting_batches(made, draws)

    class Linear(torch.nn.Module):
        def __init__(self, width, num_classes):
            super().__init__()
            self.width, self.fc = width, torch.nn.Linear(12, num_classes)
            self.register_buffer("temperature", torch.ones(()))

        def forward(self, x, t=None):
            return self.fc(x.flatten(1)) / self.temperature

    class Config:
        def __init__(self, width, num_classes, in_channels):
            self.args = (width, num_classes)
            assert in_channels == 3                 # the images' channel count

        def build(self):
            return Linear(*self.args)

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            opts.append(kwargs)
            super().__init__(params, **kwargs)

    monkeypatch.setattr(evaluator, "Batches", Counting)
    monkeypatch.setattr(evaluator, "EvalConfig", Config)
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    images = np.random.default_rng(0).integers(0, 256, (8, 2, 2, 3)).astype(np.uint8)
    labels = np.array([0, 1] * 4)
    logged = []
    model, _ = evaluator.train_clean_classifier(images, labels, images, labels, steps=3, width=5, seed=2,
                                                log=logged.append)
    assert made == [((64,), dict(flip="keep", seed=2))] and len(draws) == 3 and model.width == 5
    assert opts == [dict(lr=1e-3, weight_decay=1e-4)]
    assert [line.split()[2] for line in logged] == ["3/3"]


def test_calibration_keeps_the_temperature_in_range_on_separable_and_uninformative_logits():
    """Degenerate held-out logits have no NLL minimiser at a finite T > 0; fit_temperature returns the bound the
    NLL falls towards (it used to return T = 2.3e-9 and 784 here), and calibrate stores and reports that T."""
    from classifier import T_MAX, T_MIN, calibrate, fit_temperature
    labels = torch.arange(200) % 2
    separable = 0.01 * torch.nn.functional.one_hot(labels, 2).float()    # every label the argmax: NLL falls as T -> 0
    uninformative = torch.tensor([[1.0, 0.0]]).repeat(200, 1)            # balanced labels: NLL falls as T -> inf
    assert fit_temperature(separable, labels) == pytest.approx(T_MIN)
    assert fit_temperature(uninformative, labels) == pytest.approx(T_MAX)
    model = evaluator.EvalNet(in_channels=1, width=8, num_classes=2)
    report = calibrate(model, separable, labels)
    p = 1 / (1 + np.exp(-0.01 / T_MIN))            # p(true label) at T_MIN: sigmoid(0.2); every prediction right
    assert model.temperature.item() == pytest.approx(T_MIN) and report["temperature"] == pytest.approx(T_MIN)
    assert report["ece_after"] == pytest.approx(1 - p, abs=1e-6)
    assert report["nll_after"] == pytest.approx(-np.log(p), abs=1e-6)
