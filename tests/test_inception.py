"""The FID Inception v3 (appendix/inception.py) and the reference sets of `sample.py --quality` (App. I, Table S2).

No weights are downloaded: a randomly initialised FIDInceptionV3, saved as a state_dict, stands in for pytorch-fid's
pt_inception-2015-12-05-6726825d.pth. The architecture is checked against numbers from torchvision's Inception v3
(its documented parameter count and its layer definitions), the FID against a Fréchet distance computed here.
"""
import hashlib
import json

import numpy as np
import pytest
import torch

from celeba_tree import make_celeba_tree
from cli import InputError
from appendix.inception import FIDInceptionV3, inception_features, load_fid_inception, max_pool_same, preprocess, tf_avg_pool
from test_cli import run


def frechet_by_gram(x, y):
    """The Fréchet distance of the Gaussians fitted to the rows of x [n, D] and y [m, D], computed without any D × D
    matrix: with A, B the centred rows, Σx = AᵀA / (n-1) and Σy = BᵀB / (m-1), and the non-zero eigenvalues of
    Σx Σy are those of M Mᵀ with M = A Bᵀ / sqrt((n-1)(m-1)), so Tr (Σx^½ Σy Σx^½)^½ = Σ sqrt(eig(M Mᵀ))
    (the eigenvalues of a small symmetric matrix)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    a, b = x - x.mean(0), y - y.mean(0)
    m = a @ b.T / np.sqrt((len(x) - 1) * (len(y) - 1))
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(m @ m.T), 0, None)).sum()
    trace_x, trace_y = (a * a).sum() / (len(x) - 1), (b * b).sum() / (len(y) - 1)
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + trace_x + trace_y - 2 * cross)


# ---------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------

def test_parameters_and_keys_are_those_of_the_fid_inception_file():
    # torchvision documents 27,161,264 parameters for Inception v3 with its auxiliary head and 1000 classes. The
    # FID graph has no auxiliary head (conv0 768->128 1x1 + BN, conv1 128->768 5x5 + BN, fc 768->1000) and 1008
    # classes.
    aux = (768 * 128 + 2 * 128) + (128 * 768 * 25 + 2 * 768) + (768 * 1000 + 1000)
    net = FIDInceptionV3()
    assert sum(p.numel() for p in net.parameters()) == 27_161_264 - aux + 8 * 2048 + 8
    state = net.state_dict()
    # 94 convolutions (stem 5, Mixed_5b-d 3 x 7, 6a 4, 6b-e 4 x 10, 7a 6, 7b-c 2 x 9), each conv.weight and
    # bn.{weight, bias, running_mean, running_var, num_batches_tracked}, and fc.{weight, bias}
    assert len(state) == 94 * 6 + 2
    shapes = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
              "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1), "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
              "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3), "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
              "Mixed_6e.branch7x7dbl_4.conv.weight": (192, 192, 7, 1),
              "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
              "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
              "Mixed_7c.branch3x3_2b.conv.weight": (384, 384, 3, 1), "Mixed_7c.branch_pool.bn.running_var": (192,),
              "fc.weight": (1008, 2048), "fc.bias": (1008,)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert {m.eps for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}


def test_pools_of_the_tf_graph():
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    # 'SAME' average: the corner averages its 4 inputs inside the image, an edge pixel its 6, the centre all 9
    assert tf_avg_pool(x)[0, 0].tolist() == [[2.0, 2.5, 3.0], [3.5, 4.0, 4.5], [5.0, 5.5, 6.0]]
    assert max_pool_same(x)[0, 0].tolist() == [[4.0, 5.0, 5.0], [7.0, 8.0, 8.0], [7.0, 8.0, 8.0]]
    net = FIDInceptionV3()
    pools = {name: getattr(net, f"Mixed_{name}").paths[-1][0] for name in ("5b", "5c", "5d", "6b", "6c", "6d", "6e",
                                                                            "7b", "7c")}
    assert pools == {**{n: tf_avg_pool for n in pools if n != "7c"}, "7c": max_pool_same}


def test_preprocess_is_pytorch_fids_resize_and_scale():
    images = np.zeros((3, 2, 2, 3), np.uint8)
    images[1], images[2, :, 1] = 255, 255                 # image 2: left column black, right column white
    x = preprocess(images)
    assert x.shape == (3, 3, 299, 299) and (x[0] == -1).all() and torch.allclose(x[1], torch.ones(1), atol=1e-6)
    # bilinear with align_corners=False: output column j samples the input at (j + 0.5) · 2 / 299 - 0.5, clamped
    src = np.clip((np.arange(299) + 0.5) * 2 / 299 - 0.5, 0, 1)
    np.testing.assert_allclose(x[2, :, 150].numpy(), np.broadcast_to(2 * src - 1, (3, 299)), atol=1e-6)
    assert abs(x[2, 0, 0, 149]) < 1e-6                     # the middle column: half way, 0 in [-1, 1]


# ---------------------------------------------------------------------------------------------------
# Loading a weight file
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random FIDInceptionV3 and its state_dict saved as a weight file."""
    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(net.state_dict(), path)
    return net, path


@pytest.fixture(scope="module")
def features(weights):
    """pool3 features of two small image sets through the network loaded from the file."""
    loaded, _ = load_fid_inception(weights[1])
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (2, 3, 24, 24, 3), dtype=np.uint8)
    return inception_features(loaded, x, batch_size=2), inception_features(loaded, y)


def test_the_weight_file_loads_strictly_and_is_named(weights):
    net, path = weights
    loaded, description = load_fid_inception(path)
    assert not loaded.training
    saved = net.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert "FID Inception v3 pool3" in description and f"sha256 {digest[:8]}" in description
    assert "NOT pytorch-fid's file" in description          # random weights: not the standard FID's
    # files saved by a PyTorch without BatchNorm's num_batches_tracked load too
    old = {k: v for k, v in saved.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, path.with_name("old.pth"))
    assert torch.equal(load_fid_inception(path.with_name("old.pth"))[0].fc.weight, net.fc.weight)


def test_a_wrong_weight_file_is_one_line_input_error(weights, tmp_path):
    net, _ = weights
    state = net.state_dict()
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file" * 10)
    renamed = {("Mixed_7c.pool_proj.conv.weight" if k == "Mixed_7c.branch_pool.conv.weight" else k): v
               for k, v in state.items()}
    reshaped = dict(state, **{"fc.weight": torch.zeros(1000, 2048)})
    files = {"missing": (tmp_path / "nope.pth", "not found"), "garbage": (garbage, "not a readable state_dict")}
    for name, (content, message) in {"renamed": (renamed, "1 keys missing"), "reshaped": (reshaped, "of another shape"),
                                     "nested": ({"model": state}, "not a state_dict of tensors")}.items():
        torch.save(content, tmp_path / f"{name}.pth")
        files[name] = (tmp_path / f"{name}.pth", message)
    for name, (path, message) in files.items():
        with pytest.raises(InputError) as e:
            load_fid_inception(path)
        assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value), name


# ---------------------------------------------------------------------------------------------------
# FID on Inception features
# ---------------------------------------------------------------------------------------------------

def test_features_are_2048_d_and_fid_of_a_set_with_itself_is_zero(features):
    from appendix.quality import fid
    x, y = features
    assert x.shape == (3, 2048) and y.shape == (3, 2048) and np.isfinite(x).all()
    assert x.std(0).max() > 0 and not np.allclose(x, y)          # random weights still tell images apart
    scale = x.var(0).sum()
    assert abs(fid(x, x)) < 1e-9 * scale and fid(x, y) > 0.01 * scale


def test_fid_equals_an_independent_frechet_distance(features):
    from appendix.quality import fid, frechet_distance
    x, y = features
    assert fid(x, y) == pytest.approx(frechet_by_gram(x, y), rel=1e-7)
    # fewer samples than dimensions (fid works in their span) and more: the same as the D x D computation
    rng = np.random.default_rng(1)
    for n in (5, 60):
        a, b = rng.normal(size=(n, 40)), rng.normal(size=(n + 3, 40)) * 1.5 + 0.3
        full = frechet_distance(a.mean(0), np.cov(a.T), b.mean(0), np.cov(b.T))
        assert fid(a, b) == pytest.approx(full, rel=1e-6)
        assert fid(a, b) == pytest.approx(frechet_by_gram(a, b), rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# Reference sets (index files) and the report
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A CelebA tree of 40 faces (28 in the train split), the index files of the whole train split ("full") and of
    its 6 mildest mouths ("mild"), and the paths of the train split's files in order."""
    root = tmp_path_factory.mktemp("celeba")
    latent = make_celeba_tree(root, n=40, seed=5)
    train = np.flatnonzero(latent["split"] == 0)
    mild = np.sort(np.argsort(np.abs(latent["curvature"][train]))[:6])
    (root / "full.txt").write_text("".join(f"{p}\n" for p in range(len(train))))
    (root / "mild.txt").write_text("".join(f"{p}\n" for p in mild))
    files = [root / "img_align_celeba" / f"{i + 1:06d}.jpg" for i in train]
    return root, files, mild


def celeba_config(root):
    return dict(name="celeba", path=str(root), attrs=["Smiling"], image_size=16, subset=None, oversample=None,
                split="train")


def pixels(images):
    return images.reshape(len(images), -1).astype(np.float64) / 127.5 - 1


def test_reference_sets_are_read_from_index_files(tree, tmp_path):
    from data import load_images
    from appendix.quality import quality_inputs, run_quality_report
    root, files, mild = tree
    inputs = quality_inputs([f"full={root / 'full.txt'}", str(root / "mild.txt")], None, celeba_config(root), "cpu")
    samples = np.random.default_rng(2).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    report = run_quality_report(samples, celeba_config(root), None, tmp_path, "cpu", **inputs)
    expected = {name: frechet_by_gram(pixels(load_images(paths, 16)), pixels(samples))
                for name, paths in (("full", files), ("mild", [files[i] for i in mild]))}
    assert report["fid_pixels_full"] == pytest.approx(expected["full"], rel=1e-6)
    assert report["fid_pixels_mild"] == pytest.approx(expected["mild"], rel=1e-6)
    assert abs(expected["full"] - expected["mild"]) > 1                # different references, different statistics
    assert report["reference_full"].endswith("28 CelebA train images")
    assert report["reference_mild"].endswith("6 CelebA train images")
    assert report["extractor_pixels"].startswith("raw pixels") and "fid_pixels" not in report


def test_reference_sets_are_for_celeba_runs_and_named_once(tree):
    from appendix.quality import quality_inputs
    root, _, _ = tree
    circles = dict(name="circles", image_size=16, radius=2, delta=0.2, seed=42)
    with pytest.raises(InputError, match="index files select CelebA train images"):
        quality_inputs([str(root / "full.txt")], None, circles, "cpu")
    with pytest.raises(InputError, match="the name a is given twice"):
        quality_inputs([f"a={root / 'full.txt'}", f"a={root / 'mild.txt'}"], None, celeba_config(root), "cpu")
    (root / "two.txt").write_text("0\n1\n")
    with pytest.raises(InputError, match="selects 2 train images"):
        quality_inputs([str(root / "two.txt")], None, celeba_config(root), "cpu")


def test_inception_fid_against_a_reference_set(tree, weights, tmp_path):
    """The Inception extractor end to end, on a training set of 4 (a --subset run) and a reference set of 4."""
    from data import load_images
    from appendix.quality import quality_inputs, run_quality_report
    root, files, _ = tree
    net, path = weights
    (root / "train4.txt").write_text("0\n1\n2\n3\n")
    (root / "ref4.txt").write_text("7\n11\n19\n23\n")
    config = dict(celeba_config(root), subset=str(root / "train4.txt"))
    inputs = quality_inputs([f"four={root / 'ref4.txt'}"], path, config, "cpu")
    samples = np.random.default_rng(3).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    report = run_quality_report(samples, config, None, tmp_path, "cpu", **inputs)
    both = inception_features(net, np.concatenate([load_images([files[i] for i in (7, 11, 19, 23)], 16), samples]))
    assert report["fid_inception_four"] == pytest.approx(frechet_by_gram(both[:4], both[4:]), rel=1e-6)
    assert report["extractor_inception"].startswith("FID Inception v3 pool3 (2048-d")
    assert (tmp_path / "nearest_inception.png").exists()


# ---------------------------------------------------------------------------------------------------
# sample.py
# ---------------------------------------------------------------------------------------------------

TINY_CELEBA = ["--data", "celeba", "--attr", "Smiling", "--image-size", "16", "--log-every", "50"]


@pytest.fixture(scope="module")
def celeba_run(tree, tmp_path_factory):
    root, _, _ = tree
    out = tmp_path_factory.mktemp("smile") / "run"
    run("train.py", *TINY_CELEBA, "--data-dir", root, "--out", out, "--what", "evaluator", "--eval-width", "8",
        "--eval-steps", "4")
    run("train.py", *TINY_CELEBA, "--data-dir", root, "--out", out, "--model-channels", "8", "--classifier-width", "8",
        "--channel-mult", "1,2", "--sample-steps", "2", "--eval-samples", "4", "--steps", "2",
        "--classifier-steps", "2")
    return out


def test_sample_quality_against_full_and_mild(tree, celeba_run):
    from data import load_images
    from evaluate import load_samples
    root, files, mild = tree
    run("sample.py", "--run", celeba_run, "--num-samples", "4", "--sample-steps", "2", "--quality", "--name", "q",
        "--reference", f"full={root / 'full.txt'}", "--reference", f"mild={root / 'mild.txt'}")
    report = json.loads((celeba_run / "samples" / "q" / "report.json").read_text())
    samples = pixels(load_samples(celeba_run / "samples" / "q" / "samples.npz"))
    assert report["fid_pixels_full"] == pytest.approx(frechet_by_gram(pixels(load_images(files, 16)), samples),
                                                      rel=1e-6)
    assert report["fid_pixels_mild"] == pytest.approx(
        frechet_by_gram(pixels(load_images([files[i] for i in mild], 16)), samples), rel=1e-6)
    assert report["extractor_classifier"].startswith(f"guidance classifier {celeba_run / 'classifier.pt'}")
    assert {"fid_classifier_full", "fid_classifier_mild", "reference_full", "reference_mild"} <= set(report)


@pytest.mark.parametrize("flags,message", [
    (["--reference", "{root}/full.txt"], "add --quality"),
    (["--quality", "--inception-weights", "{root}/nope.pth"], "--inception-weights {root}/nope.pth not found"),
    (["--quality", "--inception-weights", "{root}/full.txt"], "not a readable state_dict"),
    (["--quality", "--reference", "{root}/nope.txt"], "'{root}/nope.txt' is not a file"),
    (["--quality", "--reference", "full="], "--reference full=: '' is not a file"),
])
def test_sample_bad_quality_input_fails_before_sampling(tree, celeba_run, flags, message):
    root = tree[0]
    proc = run("sample.py", "--run", celeba_run, "--num-samples", "4", "--name", "bad",
               *[f.format(root=root) for f in flags], ok=False)
    assert proc.returncode == 2 and message.format(root=root) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "[sample]" not in proc.stdout
    assert not (celeba_run / "samples" / "bad").exists()
