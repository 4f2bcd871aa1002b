"""Input that used to fail quietly or with a traceback, one test per kind: numbers outside the range where the
computation stays finite, and samples that are not finite; a guidance classifier of other images; image folders
read otherwise than a file browser shows them, and one-class data for what learns to tell classes apart; corrupt
data files; flags that do nothing. Each is one line, `prog: error: ...`, exit status 2, before any work."""
import gzip
import json
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from cli import InputError
from tiny_flags import for_what
from test_cli import TINY, cases, run, tiny_run  # noqa: F401  (module fixture: a 16x16 run with a classifier)


def sample_refuses(run_dir, flags, capsys):
    """sample.py in this process: (exit status, stderr); the folder it was asked to write must not exist."""
    import sample
    with pytest.raises(SystemExit) as exit_:
        sample.main(["--run", str(run_dir), "--name", "refused", *flags])
    assert not (run_dir / "samples" / "refused").exists()
    return exit_.value.code, capsys.readouterr().err


def train_refuses(flags, monkeypatch, capsys, out):
    """train.py in this process, its data never read: (exit status, stderr)."""
    import train
    monkeypatch.setattr(train.signal, "signal", lambda *a: None)        # keep pytest's own signal handlers
    monkeypatch.setattr(train, "training_sets", lambda *a: pytest.fail("read the data before checking the flags"))
    context = [a for i, a in enumerate(flags) if "--what" in flags[max(i - 1, 0):i + 1]]   # what the run trains
    with pytest.raises(SystemExit) as exit_:
        train.main([*for_what([*TINY, "--steps", "1", *context]), "--out", str(out), *flags])
    return exit_.value.code, capsys.readouterr().err


def one_line(code, err, message):
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def gray_folder(folder, labels, size=16):
    """Grayscale PNGs {label}_{k}.png: class 1 has a bright square on the right, class 0 on the left."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, label in enumerate(labels):
        img = np.zeros((size, size), dtype=np.uint8)
        img[6:10, (10 if label else 2):(14 if label else 6)] = 200 + k
        Image.fromarray(img).save(folder / f"{label}_{k}.png")
    return folder


# ---------------------------------------------------------------------------------------------------
# 1. Numbers: the range where the computation stays finite, and samples that are not finite numbers
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,message", cases("""
    --lambdas 1e30,1e30 => --lambdas '1e30,1e30': each weight must be in [-1e+06, 1e+06]
    --lambdas 1e39,1e39 => --lambdas '1e39,1e39': each weight must be in [-1e+06, 1e+06]
    --ddim --eta inf => argument --eta: inf is not a finite float32 number
    --ddim --eta 1.5 => --eta must be in [0, 1]
    --cfg-scale 1e39 => argument --cfg-scale: 1e39 is not a finite float32 number
    --target 0.4 --target-scale inf => argument --target-scale: inf is not a finite float32 number
    --target 0.4 --target-scale 1e30 => --target-scale at most 1e+06
    --target 0.4 --corrector-steps 1 --corrector-size 1e300 => argument --corrector-size: 1e300 is not a finite float32
    --target 0.4 --corrector-steps 1 --corrector-size 2 => --corrector-size below 2
    --target 1e39 => argument --target: 1e39 is not a finite float32 number
    --seed 18446744073709551616 => --seed must be in [0, 4294967295], got 18446744073709551616
"""))
def test_sample_numbers_outside_the_finite_range_are_refused(tiny_run, capsys, flags, message):
    one_line(*sample_refuses(tiny_run, flags, capsys), message)


@pytest.mark.parametrize("flags,message", cases("""
    --lr 1e39 => argument --lr: 1e39 is not a finite float32 number
    --vb-scale 1e39 => argument --vb-scale: 1e39 is not a finite float32 number
    --spectral-norm --lipschitz 1e39 => argument --lipschitz: 1e39 is not a finite float32 number
    --classifier-lr nan => argument --classifier-lr: nan is not a finite float32 number
    --seed 18446744073709551616 => --seed must be an integer in [0, 4294967295], got 18446744073709551616
    --channel-mult 1,0,2 => --channel-mult 1,0,2: each multiplier times --model-channels 8 must be a finite width
    --channel-mult 1,2,inf => --channel-mult 1,2,inf: each multiplier times --model-channels 8 must be a finite width
    --arch dit --dit-patch 0 => --dit-patch must be a positive integer, got 0
"""))
def test_train_numbers_outside_the_finite_range_are_refused(tmp_path, monkeypatch, capsys, flags, message):
    one_line(*train_refuses(flags, monkeypatch, capsys, tmp_path / "new"), message)
    assert not (tmp_path / "new").exists()


def test_samples_that_are_not_finite_are_an_error_never_black_images(tiny_run, tmp_path):
    """NaN samples were clamped to black uint8 images and counted as "0 circles". A DDPM whose last layer's
    weights are NaN makes every sample NaN: exit 2 naming the count, and no sample folder."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken, ignore=shutil.ignore_patterns("samples"))
    state = torch.load(broken / "ddpm.pt", weights_only=True)
    last = [k for k, v in state["ema"].items() if v.is_floating_point()][-1]
    state["ema"][last].fill_(float("nan"))
    torch.save(state, broken / "ddpm.pt")
    proc = run("sample.py", "--run", broken, "--num-samples", "3", "--sample-steps", "2", "--name", "nan", ok=False)
    one_line(proc.returncode, proc.stderr, "3 of 3 samples are not finite (NaN or inf)")
    assert not (broken / "samples" / "nan").exists() and not list((broken / "samples").glob("*"))


def test_to_uint8_refuses_nan_and_inf_and_converts_finite_values():
    from cli import SamplingError
    from data import to_uint8
    x = torch.zeros(3, 1, 1, 2)
    assert to_uint8(x).tolist() == [[[[127], [127]]]] * 3
    x[1, 0, 0, 1], x[2, 0, 0, 0] = float("nan"), float("-inf")
    with pytest.raises(SamplingError, match="^2 of 3 samples are not finite"):
        to_uint8(x)


# ---------------------------------------------------------------------------------------------------
# 2. A guidance classifier must fit the run: chain, image size and channels
# ---------------------------------------------------------------------------------------------------

def test_a_classifier_of_other_channels_is_refused_before_sampling(tiny_run, tmp_path):
    """A grayscale run's classifier on an RGB run (both 16 px, same chain) ended in a convolution traceback."""
    folder = gray_folder(tmp_path / "gray", [0, 1] * 4)
    other = tmp_path / "gray_run"
    run("train.py", "--data", "folder", "--data-dir", folder, "--image-size", "16", "--classifier-width", "8",
        "--what", "classifier", "--classifier-steps", "1", "--out", other)
    assert json.loads((other / "classifier.json").read_text())["classifier"]["in_channels"] == 1
    proc = run("sample.py", "--run", tiny_run, "--classifier", other / "classifier.pt", "--lambdas", "30,30",
               "--num-samples", "2", "--name", "gray", ok=False)
    one_line(proc.returncode, proc.stderr, "takes 1-channel (grayscale) images, ")
    assert "draws 3-channel (RGB) ones" in proc.stderr and not (tiny_run / "samples" / "gray").exists()


def test_classifier_fit_compares_chain_size_and_channels():
    from infra import checkpoint as ckpt_io
    run_config = dict(data=dict(image_size=32), diffusion=dict(schedule="cosine", diffusion_steps=4000),
                      unet=dict(in_channels=3))
    clf = dict(data=dict(image_size=32), diffusion=dict(schedule="cosine", diffusion_steps=4000),
               classifier=dict(in_channels=3))
    ckpt_io.check_classifier_fits(clf, run_config, "c.pt", "r")
    ckpt_io.check_classifier_fits(dict(clf, classifier={}), run_config, "c.pt", "r")       # old configs: RGB
    with pytest.raises(InputError, match=r"c.pt takes 1-channel \(grayscale\) images, r draws 3-channel"):
        ckpt_io.check_classifier_fits(dict(clf, classifier=dict(in_channels=1)), run_config, "c.pt", "r")
    with pytest.raises(InputError, match="takes 3-channel"):
        ckpt_io.check_classifier_fits(clf, dict(run_config, arch="dit", dit=dict(in_channels=1)), "c.pt", "r")


# ---------------------------------------------------------------------------------------------------
# 3. Image folders as a file browser shows them; two or more classes for what tells classes apart
# ---------------------------------------------------------------------------------------------------

def test_symlinked_subfolders_and_files_are_read_and_hidden_files_skipped(tmp_path):
    from data import load_image_folder
    gray_folder(tmp_path / "elsewhere" / "ones", [1] * 6)
    gray_folder(tmp_path / "data" / "zeros", [0] * 5)
    (tmp_path / "data" / "ones").symlink_to(tmp_path / "elsewhere" / "ones", target_is_directory=True)
    (tmp_path / "data" / "0_99.png").symlink_to(tmp_path / "elsewhere" / "ones" / "1_0.png")   # its label: its name
    (tmp_path / "data" / "zeros" / "loop").symlink_to(tmp_path / "data", target_is_directory=True)  # read once
    (tmp_path / "data" / "zeros" / "._0_1.png").write_bytes(b"\0\5\26\7 a macOS resource fork")
    images, labels, classes = load_image_folder(tmp_path / "data")
    assert classes == ["0", "1"] and images.shape == (12, 16, 16, 3)
    assert sorted(labels.tolist()) == [0] * 6 + [1] * 6


@pytest.mark.parametrize("flags,message", cases("""
    --what classifier => the guidance classifier tells classes apart, but the data has 6 examples of class(es) [0]
    --what all => the guidance classifier tells classes apart
    --what ddpm --cfg-dropout 0.1 => --cfg-dropout's DDPM tells classes apart
"""))
def test_one_class_data_is_refused_for_what_learns_the_classes(tmp_path, monkeypatch, capsys, flags, message):
    import train
    folder = gray_folder(tmp_path / "one", [0] * 6)
    monkeypatch.setattr(train.signal, "signal", lambda *a: None)
    for step in ("train_ddpm", "train_classifier"):
        monkeypatch.setattr(train, step, lambda *a, **k: pytest.fail("trained on one class"))
    with pytest.raises(SystemExit) as exit_:
        train.main(["--data", "folder", "--data-dir", str(folder), "--image-size", "16", "--out",
                    str(tmp_path / "new"), *flags])
    one_line(exit_.value.code, capsys.readouterr().err, message)
    assert not (tmp_path / "new").exists()


def test_the_evaluator_and_the_filter_refuse_one_class_before_reading_images(monkeypatch):
    from appendix import evaluator
    monkeypatch.setattr(evaluator, "celeba_split", lambda *a: ([], np.ones(7, dtype=np.int64), None, None, None))
    monkeypatch.setattr(evaluator, "load_images", lambda *a: pytest.fail("read the images"))
    with pytest.raises(InputError, match=r"Smiling \(evaluator, App. D filter\) tells classes apart, but the data has "
                                         r"7 examples of class\(es\) \[1\] only"):
        evaluator.celeba_splits(dict(path="C", attrs=["Smiling"], image_size=16))


@pytest.mark.parametrize("labels,ok", [([0, 1, 1], True), ([2, 0, 1, 3], True), ([0, 0], False), ([1, 1], False),
                                       ([0, 1, 3], False), ([], False)])
def test_check_classes_wants_every_class_0_to_k_minus_1(labels, ok):
    from data import check_classes
    if ok:
        check_classes(np.array(labels, dtype=np.int64), "x")
    else:
        with pytest.raises(InputError, match="x tells classes apart"):
            check_classes(np.array(labels, dtype=np.int64), "x")


# ---------------------------------------------------------------------------------------------------
# 4. Corrupt data files: one line naming the file
# ---------------------------------------------------------------------------------------------------

def broken_gzip(path, payload):
    """`payload` gzipped, then a few bytes of its deflate stream flipped (the CRC would catch what zlib lets by)."""
    raw = bytearray(gzip.compress(payload))
    for k in range(20, 28):
        raw[k] ^= 0x5A
    path.write_bytes(bytes(raw))
    return path


def test_a_corrupt_gzipped_idx_or_csv_file_is_one_line_naming_it(tmp_path):
    from beyond.mnist import read_digits_csv, read_idx
    idx = broken_gzip(tmp_path / "train-images-idx3-ubyte.gz", bytes.fromhex("00000801") + struct.pack(">I", 300)
                      + bytes(range(256)) * 2)
    with pytest.raises(InputError, match=r"cannot read .*train-images-idx3-ubyte\.gz \(corrupt or cut off\?\)") as e:
        read_idx(idx)
    assert "\n" not in str(e.value)
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress(bytes.fromhex("00000801") + struct.pack(">I", 300) + bytes(range(256)) * 2)[:-30])
    with pytest.raises(InputError, match=r"cut\.gz \(corrupt or cut off\?\)"):
        read_idx(cut)
    csv = broken_gzip(tmp_path / "digits.csv.gz", ("0," * 784 + "3\n").encode() * 50)
    with pytest.raises(InputError, match=r"cannot read digits from .*digits\.csv\.gz"):
        read_digits_csv(csv)


def test_an_image_claiming_a_huge_size_is_one_line_naming_it(tmp_path):
    """A 30000x30000 header: Pillow's DecompressionBombError was not among the errors read_rgb turned into one line."""
    from data import load_image_folder
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    (tmp_path / "0_0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2,
                                       0, 0, 0)) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))
    with pytest.raises(InputError, match=r"cannot read image .*0_0\.png: DecompressionBombError") as e:
        load_image_folder(tmp_path)
    assert "\n" not in str(e.value)


def test_a_cut_off_or_corrupt_samples_file_is_one_line_naming_it(tmp_path):
    """scripts/repeat.py, scripts/sweep.py and the reports read samples.npz / ddpm_samples.npz back: zip or zlib tracebacks before."""
    from evaluate import load_samples, save_samples
    save_samples(tmp_path / "s.npz", np.arange(4 * 8 * 8 * 3, dtype=np.uint8).reshape(4, 8, 8, 3) % 7)
    raw = (tmp_path / "s.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[:len(raw) // 2])
    (tmp_path / "bad.npz").write_bytes(raw[:60] + b"\xff" * 10 + raw[70:])
    assert load_samples(tmp_path / "s.npz").shape == (4, 8, 8, 3)
    for name, error in (("cut.npz", "BadZipFile"), ("bad.npz", "error: Error -3 while decompressing")):
        with pytest.raises(InputError, match=rf"cannot read samples from .*{name} \({error}"):
            load_samples(tmp_path / name)


def test_celeba_text_files_that_are_not_text_and_a_corrupt_run_config_are_one_line(tmp_path):
    from infra import checkpoint as ckpt_io
    from data import read_celeba_attributes, read_celeba_partition
    (tmp_path / "list_attr_celeba.csv").write_bytes(b"image_id,Smiling\n000001.jpg,\xff\xfe1\n")
    with pytest.raises(InputError, match=r"cannot read .*list_attr_celeba\.csv as text \(UnicodeDecodeError"):
        read_celeba_attributes(tmp_path)
    (tmp_path / "list_eval_partition.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(InputError, match=r"list_eval_partition\.txt as text"):
        read_celeba_partition(tmp_path)
    (tmp_path / "config.json").write_text('{"data": {"name": "circles"')
    with pytest.raises(InputError, match=r"config\.json is not a readable run config \(JSONDecodeError"):
        ckpt_io.read_config(tmp_path / "config.json")


# ---------------------------------------------------------------------------------------------------
# 5. Flags that would do nothing
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,message", cases("""
    --eta 0.7 => --eta does nothing here: it is DDIM's η; add --ddim
    --lambdas 30,30 --guide-t-min 4000 => --guide-t-min 4000 is above every guided timestep of this chain (3999)
    --lambdas 30,30 --sample-steps 2 --guide-at mean --guide-t-min 1 => above every guided timestep of this chain (0)
    --edit --lambdas 0,30 --sample-steps 4 --t-fraction 0.25 --guide-t-min 2000 => chain (1333): no step would be
    --lambdas 0,0 --guide-t-min 100 => --guide-t-min limits classifier guidance: it needs --lambdas with a weight
    --edit --lambdas 0,0 => --edit needs guidance
    --points 3 => --points does nothing here
    --t-fraction 0.3 => --t-fraction does nothing here
    --images a.png => --images does nothing here
    --interpolate --lambdas 30,30 => --lambdas does nothing here: --interpolate decodes
    --interpolate --seed 3 => --seed does nothing here: --interpolate decodes
    --interpolate --num-samples 5 => --num-samples does nothing here
    --edit --lambdas 0,30 --batch-size 2 => --batch-size does nothing here
    --interpolate --heatmaps all => --heatmaps does nothing here: circles samples only
    --target 0.4 --corrector-size 0.3 => --corrector-size does nothing here: it sizes the steps of --corrector-steps
"""))
def test_sample_flags_that_would_do_nothing_are_refused(tiny_run, capsys, flags, message):
    one_line(*sample_refuses(tiny_run, flags, capsys), message)


@pytest.mark.parametrize("flags,message", cases("""
    --dit-hidden 32 => --dit-hidden does nothing here: add --arch dit
    --lipschitz 0.7 => --lipschitz does nothing here
    --resume => --resume: no checkpoint in
    --what evaluator --data celeba --data-dir C --resume => --what evaluator trains from scratch
    --model-channels 0 => --model-channels must be a positive integer, got 0
    --num-res-blocks 0 => --num-res-blocks must be a positive integer, got 0
    --classifier-width 0 => --classifier-width must be a positive integer, got 0
    --attention-resolutions 7 => --attention-resolutions 7: the U-Net's feature maps are 16,8,4 px wide
    --data-dir somewhere => --data-dir does nothing here: circles images are drawn
    --data sizes --radius 3 => --radius does nothing here
    --attr Young => --attr does nothing here
    --oversample 0:2 => --oversample does nothing here
    --data folder --data-dir tests --data-seed 3 => --data-seed does nothing here
    --data folder --data-dir tests --delta 0.1 => --delta does nothing here
    --guide-t-min 4000 => --guide-t-min is a timestep in [0, 3999]
    --what classifier --model-channels 8 => --model-channels does nothing here: it sets the DDPM, and --what classifier trains none
    --what classifier --steps 10 => --steps does nothing here: it sets the DDPM
    --what classifier --amp => --amp does nothing here: it sets the DDPM
    --what classifier --no-amp => --amp does nothing here: it sets the DDPM
    --what classifier --sample-steps 8 => --sample-steps does nothing here: it sets the DDPM
    --what classifier --eval-samples 8 => --eval-samples does nothing here: it sets the DDPM
    --what ddpm --classifier-steps 10 => --classifier-steps does nothing here: it sets the guidance classifier, and --what ddpm trains none
    --what ddpm --spectral-norm => --spectral-norm does nothing here: it sets the guidance classifier
    --what ddpm --classifier-name c2 => --classifier-name does nothing here: it sets the guidance classifier
    --eval-width 8 => --eval-width does nothing here: it sets the clean evaluation classifier, and --what all trains none
    --what ddpm --eval-steps 8 => --eval-steps does nothing here: it sets the clean evaluation classifier
    --what evaluator --data celeba --data-dir C --steps 3 => --steps does nothing here: it sets the DDPM, and --what evaluator trains none
"""))
def test_train_flags_that_would_do_nothing_are_refused(tmp_path, monkeypatch, capsys, flags, message):
    one_line(*train_refuses(flags, monkeypatch, capsys, tmp_path / "new"), message)
    assert not (tmp_path / "new").exists()


def test_a_model_added_to_a_run_refuses_flags_that_would_change_its_data_or_chain(tiny_run, tmp_path, monkeypatch,
                                                                                  capsys):
    """--what classifier takes the run's data and chain from its config.json: a different --image-size (or
    --diffusion-steps, --delta, ...) was silently replaced by the run's."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(tiny_run / "config.json", out / "config.json")
    for flags, message in ((["--image-size", "32"], "--image-size 32: "), (["--diffusion-steps", "1000"],
                                                                          "diffusion.diffusion_steps 4000")):
        code, err = train_refuses(["--what", "classifier", *flags], monkeypatch, capsys, out)
        one_line(code, err, message)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_the_folder_oversample_flag_repeats_classes(tmp_path):
    """--oversample was kept for CelebA only: --data folder dropped it from the run's config."""
    import config
    folder = gray_folder(tmp_path / "f", [0, 1, 1])
    args = config.parse_args(["--data", "folder", "--data-dir", str(folder), "--oversample", "0:2"])
    from data import load_data
    _, labels = load_data(config.build_config(args)["data"])
    assert labels.tolist() == [0, 0, 1, 1]



def test_a_classifier_is_added_to_a_run_of_another_chain_length(tiny_run, tmp_path, monkeypatch):
    """--what classifier on a run trained with --diffusion-steps 40: the preset's guidance window (3T/8 of the
    default T = 4000, 1500) belongs to the DDPM and was checked against the run's T = 40, refusing a flag never given."""
    import train
    monkeypatch.setattr(train.signal, "signal", lambda *a: None)
    out = tmp_path / "run"
    out.mkdir()
    config = json.loads((tiny_run / "config.json").read_text())
    config["diffusion"]["diffusion_steps"], config["guide_t_min"] = 40, 15
    (out / "config.json").write_text(json.dumps(config))
    checked = train.main(["--what", "classifier", "--classifier-steps", "1", "--out", str(out)], check_only=True)
    assert checked["diffusion"]["diffusion_steps"] == 40
