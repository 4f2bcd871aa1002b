"""appendix/evaluator.py's App. D filter beyond the symmetric top-k: k per class (the Young set of [ZSI] Sec. 5.4), a pluggable
stage-1 scorer, the flag values, the 4-class names of App. F, and where sample.py finds a run's evaluator."""
from pathlib import Path

import numpy as np
import pytest
import torch

from infra import checkpoint as ckpt_io
from appendix import evaluator
from cli import InputError
from data import celeba_labels
from appendix.evaluator import class_names, filter_targets, selection_name, stage1_kind, top_k_extremes

#            index:  0     1     2     3     4     5     6     7
P1 = np.array([0.10, 0.90, 0.30, 0.05, 0.60, 0.99, 0.40, 0.70])
LABELS = np.array([0, 1, 0, 0, 1, 1, 0, 1])
# class 0 by p(class 1) ascending: 3 (0.05), 0 (0.10), 2 (0.30), 6 (0.40)
# class 1 by p(class 1) descending: 5 (0.99), 1 (0.90), 7 (0.70), 4 (0.60)


@pytest.mark.parametrize("k,kept", [
    ((1, 3), [1, 3, 5, 7]),          # the lowest of class 0 (3); the three highest of class 1 (5, 1, 7)
    ((3, 1), [0, 2, 3, 5]),          # 3, 0, 2 of class 0; 5 of class 1
    ((2, 2), [0, 1, 3, 5]),          # a symmetric pair is the paper's k = 2
    ((4, 0), [0, 2, 3, 6]),
])
def test_top_k_per_class_keeps_the_k0_lowest_of_class_0_and_the_k1_highest_of_class_1(k, kept):
    assert top_k_extremes(P1, LABELS, k).tolist() == kept
    assert top_k_extremes(P1, LABELS, 2).tolist() == top_k_extremes(P1, LABELS, (2, 2)).tolist()


class Brightness(torch.nn.Module):
    """p(class 1 | image) = sigmoid(10 · mean pixel in [-1, 1]): brighter images are more 'class 1'."""

    def forward(self, x, t=None):
        s = 10 * x.mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(s), s], dim=1)


def test_extreme_filter_with_a_stage1_scorer_and_k_per_class(monkeypatch):
    """Stage 1 by a given scorer (no classifier trained on all examples: only the 2 members are trained); the
    brightness classifier ranks. Index 9 (v = 140, label 0) is dropped by the scorer's p(own label) = 0.27 < 0.5;
    survivors of class 0 by brightness: 3 (0), 0 (10), 2 (60), 6 (100); of class 1: 5 (255), 1 (250), 4 (200),
    7 (180), 8 (170)."""
    values = np.array([10, 250, 60, 0, 200, 255, 100, 180, 170, 140])
    labels = np.array([0, 1, 0, 0, 1, 1, 0, 1, 1, 0])
    images = np.broadcast_to(values[:, None, None, None], (10, 2, 2, 3)).astype(np.uint8)
    trained, scored = [], []

    def fake_train(imgs, labs, *args, **kwargs):
        trained.append(len(labs))
        return Brightness(), {}

    def scorer(imgs):
        scored.append(imgs)
        return evaluator.predict_probs(Brightness(), imgs)

    monkeypatch.setattr(evaluator, "train_clean_classifier", fake_train)
    logged = []
    out = evaluator.extreme_filter(images, labels, images, labels, Brightness(), sizes=[(1, 4), (3, 1), (5, 1), 4],
                                   tau1=0.5, tau2=0.5, members=2, log=logged.append, stage1=scorer)
    assert len(scored) == 1 and scored[0] is images and trained == [5, 4]     # the 9 stage-1 survivors in 2 folds
    assert out["stage2"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8] and out["survivors"] == (4, 5)
    assert out["indices"][(1, 4)].tolist() == [1, 3, 4, 5, 7]                # 3; 5, 1, 4, 7
    assert out["indices"][(3, 1)].tolist() == [0, 2, 3, 5]                   # 3, 0, 2; 5
    assert out["indices"][4].tolist() == [0, 1, 3, 5]                        # the size: 2 per side
    assert (5, 1) not in out["indices"] and out["short"] == {(5, 1): (4, 5)}    # 5 of class 0 asked, 4 survive
    assert "[filter] top-k 5,1: only 4 of class 0 and 5 of class 1 survive" in logged
    assert out["counts"]["top_k_k1-4"] == 5 and out["counts"]["top_k_4"] == 4 and "top_k_k5-1" not in out["counts"]


@pytest.mark.parametrize("train_size,top_k,attrs,expected", [
    (None, None, 1, [[60000, 30000, 10000, 5000]]),
    ("60,30", None, 2, [[60, 30], [60, 30]]),
    (None, "7000,15000", 1, [[(7000, 15000)]]),
    (None, "30000,30000,15000,15000", 2, [[(30000, 30000)], [(15000, 15000)]]),
])
def test_filter_targets_parse_sizes_or_k_per_class(train_size, top_k, attrs, expected):
    assert filter_targets(train_size, top_k, attrs) == expected


@pytest.mark.parametrize("train_size,top_k,attrs,message", [
    ("60", "7,15", 1, "pass one of them"),
    (None, "7000", 1, "--top-k 7000 has 1 value(s); give the k of label 0 then of label 1, e.g."),
    (None, "7,15,3", 1, "has 3 value(s)"),
    (None, "7,15", 2, "for each attribute in --attr order"),
    (None, "0,15", 1, "--top-k 0,15: every k must be a positive integer"),
    (None, "7,-2", 1, "positive integer"),
    (None, "7,1.5", 1, "not a comma-separated list"),
    ("1,60", None, 1, "--train-size takes subset sizes >= 2"),
])
def test_filter_targets_bad_values_are_one_line(train_size, top_k, attrs, message):
    with pytest.raises(InputError) as e:
        filter_targets(train_size, top_k, attrs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_selection_names_tell_sizes_from_k_per_class():
    assert selection_name(60000) == "60000" and selection_name((7000, 15000)) == "k7000-15000"
    assert selection_name((11000, 11000)) != selection_name(22000)


@pytest.mark.parametrize("attr,mode,kind", [("Young", "auto", "evaluator"), ("Smiling", "auto", "trained"),
                                            ("Black_Hair/Blond_Hair", "auto", "trained"),
                                            ("Young", "trained", "trained"), ("Smiling", "evaluator", "evaluator")])
def test_stage1_follows_the_paper_for_auto_and_the_flag_otherwise(attr, mode, kind):
    assert stage1_kind(attr, mode) == kind


def test_class_names_follow_the_labels_of_the_two_attribute_loader():
    """data.celeba_labels is the oracle: each of the four (smile, black) rows gets the class whose name states its
    bits; the order is 0 smile & black, 1 smile & blond, 2 no smile & black, 3 no smile & blond."""
    names = ["Black_Hair", "Blond_Hair", "Smiling"]
    rows = [(smile, black) for smile in (1, 0) for black in (1, 0)]
    values = np.array([[black, 1 - black, smile] for smile, black in rows], dtype=np.uint8)
    labels, usable = celeba_labels(values, names, ["Smiling", "Black_Hair/Blond_Hair"])
    assert usable.all() and labels.tolist() == [0, 1, 2, 3]
    text = class_names(["Smiling", "Black_Hair/Blond_Hair"])
    for (smile, black), label in zip(rows, labels):
        assert text[label] == f"{'' if smile else 'not '}Smiling & {'Black_Hair' if black else 'Blond_Hair'}"
    assert class_names(["Smiling"]) == ["not Smiling", "Smiling"]


def save_evaluator(path, kind="evaluator", attr="Smiling", image_size=64):
    model = evaluator.EvalConfig(width=4).build()
    ckpt_io.save_atomic(dict(kind=kind, config=dict(evaluator=dict(width=4, num_classes=2),
                                                    data=dict(attrs=[attr], image_size=image_size)),
                             model=model.state_dict()), path)
    return path


CELEBA = dict(name="celeba", attrs=["Smiling"], subset=None, image_size=64)


def test_a_stage_1_that_keeps_fewer_images_than_members_is_one_line_before_the_ensemble(monkeypatch):
    values, labels = np.array([10, 250, 128]), np.array([0, 1, 0])     # 128: p(own label) 0.49 < τ1
    images = np.broadcast_to(values[:, None, None, None], (3, 2, 2, 3)).astype(np.uint8)
    monkeypatch.setattr(evaluator, "train_clean_classifier", lambda *a, **k: pytest.fail("no member is trained"))
    with pytest.raises(InputError, match=r"kept 2 of 3 images, fewer than the 3 ensemble members"):
        evaluator.extreme_filter(images, labels, images, labels, Brightness(), sizes=[2], tau1=0.6, members=3,
                                 log=lambda m: None, stage1=lambda imgs: evaluator.predict_probs(Brightness(), imgs))


def test_evaluator_paths_look_in_the_run_then_next_to_the_subset_file(tmp_path):
    filtered, run = tmp_path / "smile", tmp_path / "smile_30k"
    filtered.mkdir(), run.mkdir()
    data = dict(CELEBA, subset=str(filtered / "subset_Smiling_30000.txt"))
    found = save_evaluator(filtered / "evaluator_Smiling.pt")
    assert evaluator.evaluator_paths(None, data, run) == [found]          # the data-size ablation (Sec. 5.2)
    own = save_evaluator(run / "evaluator_Smiling.pt")
    assert evaluator.evaluator_paths(None, data, run) == [own]            # the run's own comes first
    given = tmp_path / "given.pt"
    save_evaluator(given)
    assert evaluator.evaluator_paths([str(given)], data, run) == [given]
    two = dict(data, attrs=["Smiling", "Black_Hair/Blond_Hair"])
    hair = save_evaluator(filtered / "evaluator_Black_Hair_Blond_Hair.pt", attr="Black_Hair/Blond_Hair")
    assert evaluator.evaluator_paths(None, two, run) == [own, hair]      # one per attribute, in --attr order
    assert evaluator.evaluator_paths(None, dict(name="circles"), run) == []


@pytest.mark.parametrize("subset", [None, "elsewhere/subset_Smiling_60000.txt"])
def test_a_celeba_run_without_an_evaluator_is_an_error_naming_the_flag(tmp_path, subset):
    with pytest.raises(InputError) as e:
        evaluator.evaluator_paths(None, dict(CELEBA, subset=subset), tmp_path)
    message = str(e.value)
    assert "pass --evaluator PATH" in message and "evaluator_Smiling.pt" in message and "\n" not in message
    assert (subset is None) != ("elsewhere" in message)                  # names the folders it looked in


def test_evaluator_paths_refuse_a_checkpoint_that_is_not_an_evaluator(tmp_path):
    path = save_evaluator(tmp_path / "classifier.pt", kind="classifier")
    with pytest.raises(InputError, match="is not an evaluation classifier"):
        evaluator.evaluator_paths([str(path)], CELEBA, tmp_path)


def test_evaluator_paths_refuse_evaluators_of_another_attribute_size_or_count(tmp_path):
    hair = str(save_evaluator(tmp_path / "hair.pt", attr="Black_Hair/Blond_Hair"))
    small = str(save_evaluator(tmp_path / "small.pt", image_size=16))
    smile = str(save_evaluator(tmp_path / "smile.pt"))
    for given, message in (([hair], "scores Black_Hair/Blond_Hair at 64px, the run needs Smiling at 64px"),
                           ([small], "scores Smiling at 16px, the run needs Smiling at 64px"),
                           ([smile, smile], "got 2 --evaluator for the run's 1 attribute"),
                           ([hair, smile], "got 2 --evaluator")):
        with pytest.raises(InputError, match=message):
            evaluator.evaluator_paths(given, CELEBA, tmp_path)
    two = dict(CELEBA, attrs=["Smiling", "Black_Hair/Blond_Hair"])
    assert evaluator.evaluator_paths([smile, hair], two, tmp_path) == [Path(smile), Path(hair)]
    with pytest.raises(InputError, match="needs Smiling"):                        # --attr order
        evaluator.evaluator_paths([hair, smile], two, tmp_path)
    with pytest.raises(InputError, match="circles data, scored without one: drop --evaluator"):
        evaluator.evaluator_paths([smile], dict(name="circles"), tmp_path)


@pytest.mark.parametrize("flags,message", [
    (["--top-k", "7000"], "--top-k 7000 has 1 value(s)"),
    (["--top-k", "0,15000"], "--top-k 0,15000: every k must be a positive integer"),
    (["--attr", "Smiling,Young", "--top-k", "7,15"], "for each attribute in --attr order"),
    (["--top-k", "7,15", "--train-size", "60"], "pass one of them"),
    (["--train-size", "1"], "--train-size takes subset sizes >= 2"),
    (["--attr", "Smiling,Smiling"], "an attribute is given twice"),
    (["--attr", "Smiling,Young,Male"], "the filter takes one attribute or two"),
])
def test_train_py_checks_the_top_k_flags_before_reading_data(tmp_path, monkeypatch, capsys, flags, message):
    import train
    monkeypatch.setattr(train.signal, "signal", lambda *a: None)        # keep pytest's own signal handlers
    monkeypatch.setattr(train, "filter_run", lambda *a, **k: pytest.fail("filtered before checking the flags"))
    with pytest.raises(SystemExit) as exit_:
        train.main(["--data", "celeba", "--data-dir", str(tmp_path / "no_tree"), "--what", "filter", "--out",
                    str(tmp_path / "new" / "run"), *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "new").exists()


def test_reference_sets_are_the_mild_scores_closest_to_one_half_and_random_full_images(tmp_path):
    """App. I / Table S2: "mild" = the train images with p(class 1) nearest 0.5 in ℓ1, "full" = random train images."""
    from appendix.evaluator import write_reference_sets
    p1 = np.array([0.1, 0.49, 0.9, 0.52, 0.5, 0.02])
    positions = np.array([10, 11, 12, 13, 14, 15])
    sets = write_reference_sets(p1, positions, tmp_path, "reference_Smiling", seed=0, mild=3, full=4)
    assert sets["mild"].tolist() == [11, 13, 14]                      # |p - 0.5| = 0.01, 0.02, 0.0
    assert (tmp_path / "reference_Smiling_mild_3.txt").read_text() == "11\n13\n14\n"
    full = [int(v) for v in (tmp_path / "reference_Smiling_full_4.txt").read_text().split()]
    assert full == sorted(set(full)) and len(full) == 4 and set(full) <= set(positions.tolist())
    sets = write_reference_sets(p1, positions, tmp_path, "r", seed=0, mild=10, full=50)   # smaller split: all of it
    assert sets["full"].tolist() == positions.tolist() and len(sets["mild"]) == 6
