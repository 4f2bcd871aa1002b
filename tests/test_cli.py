"""The entry points end to end on a tiny 16x16 run: train, resume, sample, evaluate, and bad input."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from infra import checkpoint as ckpt_io
from classifier import spectral_norm_sigmas
from tiny_flags import for_what

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data", "circles", "--image-size", "16", "--model-channels", "8", "--classifier-width", "8",
        "--sample-steps", "4", "--eval-samples", "4", "--log-every", "2", "--ckpt-every", "2"]


def cases(table):
    """Parametrize cases from a table of `FLAGS => MESSAGE` lines: (the flags as a list, the expected message)."""
    return [(flags.split(), message.strip()) for flags, message in
            (line.split(" => ") for line in table.strip().splitlines())]


def run(script, *args, ok=True):
    """A top-level entry point ("train.py") as a file, a folder's script ("scripts/repeat.py") with -m, as README
    says to run it."""
    argv = ["-m", script[:-3].replace("/", ".")] if "/" in script else [str(ROOT / script)]
    args = for_what(args) if script == "train.py" and ok else args     # the tiny sizes its --what uses
    proc = subprocess.run([sys.executable, *argv, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "circles"
    run("train.py", *TINY, "--out", out, "--steps", "6", "--classifier-steps", "4")
    return out


def test_training_writes_the_run_folder(tiny_run):
    for name in ("config.json", "ddpm.pt", "ddpm_loss.csv", "ddpm_samples.png", "ddpm_samples.npz", "ddpm_report.md",
                 "train_examples.png", "classifier.pt", "classifier.json", "classifier_heatmap.png"):
        assert (tiny_run / name).exists(), name
    run_config = json.loads((tiny_run / "config.json").read_text())
    assert run_config["unet"]["image_size"] == 16 and run_config["diffusion"]["diffusion_steps"] == 4000
    assert run_config["guide_t_min"] == 1500           # the cpu preset guides at t >= 3T/8 only
    state = torch.load(tiny_run / "ddpm.pt", weights_only=True)
    assert state["step"] == 6 and {"model", "ema", "opt", "scaler", "rng", "config"} <= set(state)


def test_resume_continues_from_the_checkpoint(tiny_run, tmp_path):
    import shutil
    run_dir = tmp_path / "r"
    shutil.copytree(tiny_run, run_dir)
    before = torch.load(run_dir / "ddpm.pt", weights_only=True)
    proc = run("train.py", *TINY, "--out", run_dir, "--steps", "8", "--what", "ddpm", "--resume")
    assert "resumed from" in proc.stdout and "at step 6" in proc.stdout
    after = torch.load(run_dir / "ddpm.pt", weights_only=True)
    assert after["step"] == 8
    assert any(not torch.equal(before["model"][k], after["model"][k]) for k in before["model"])


@pytest.mark.parametrize("amp", [False, True])   # whatever the host's default (bf16 on AMX / AVX512-BF16 CPUs)
def test_resume_is_equivalent_to_an_uninterrupted_run(tmp_path, amp):
    # constant lr: leg 1 of b stops at --steps 2, and a decaying lr depends on the --steps of the invocation
    a, b = tmp_path / "a", tmp_path / "b"
    const = ("--what", "ddpm", "--eval-samples", "0", "--lr-decay", "0", "--amp" if amp else "--no-amp")
    run("train.py", *TINY, "--out", a, "--steps", "4", *const)
    run("train.py", *TINY, "--out", b, "--steps", "2", *const)
    run("train.py", *TINY, "--out", b, "--steps", "4", *const, "--resume")
    sa, sb = (torch.load(p / "ddpm.pt", weights_only=True) for p in (a, b))
    for k in sa["model"]:
        torch.testing.assert_close(sa["model"][k], sb["model"][k], rtol=1e-5, atol=1e-6)


def test_guided_sampling_writes_samples_and_report(tiny_run):
    run("sample.py", "--run", tiny_run, "--lambdas", "30,30", "--num-samples", "6", "--batch-size", "4",
        "--sample-steps", "4")
    out = tiny_run / "samples" / "classifier30-30_steps4_n6_seed0"
    data = np.load(out / "samples.npz")
    assert data["arr_0"].shape == (6, 16, 16, 3) and data["arr_0"].dtype == np.uint8
    report = json.loads((out / "report.json").read_text())
    assert 0 <= report["accuracy_middle"] <= 1 and report["num_samples"] == 6
    assert report["batch_size"] == 4 and int(data["batch_size"]) == 4      # the samples depend on it
    from infra import device
    host = report["host"]                    # where the figures came from: CPU flags, AMP mode, torch version
    gpu = torch.cuda.is_available()            # --device auto: CUDA with fp16 AMP where a GPU is visible
    assert report["seed"] == 0 and host["torch"] == torch.__version__ and host["device"] == ("cuda" if gpu else "cpu")
    assert host["cpu_flags"] == device.cpu_flags()
    assert host["amp"] == ("float16" if gpu else "bfloat16" if device.amp_default("cpu") else "off")
    for name in ("grid.png", "report.md", "histogram_x.png", "heatmaps.png"):
        assert (out / name).exists(), name
    from blobs import blobs, middle_fraction                # the reported fractions, recounted independently
    accuracy, broken = middle_fraction(data["arr_0"])
    counts = [len(blobs(img)) for img in data["arr_0"]]
    assert report["accuracy_middle"] == pytest.approx(accuracy) and report["zero_or_multi"] == pytest.approx(broken)
    assert report["zero_circles"] == pytest.approx(counts.count(0) / 6)
    assert report["multi_circles"] == pytest.approx(sum(c >= 2 for c in counts) / 6)
    assert report["lambdas"] == "[[30.0, 30.0]]" and report["guidance"] == "classifier30-30"


def test_heatmaps_of_the_guidance_and_main_classifiers_unless_all(tmp_path):
    from evaluate import heatmap_classifiers
    for stem in ("ddpm", "classifier", "classifier_sn", "plain_seed1", "plain_seed2"):
        (tmp_path / f"{stem}.pt").touch()
    guide = [("plain_seed2", tmp_path / "plain_seed2.pt")]
    assert sorted(heatmap_classifiers(tmp_path, guide)) == ["classifier", "classifier_sn", "plain_seed2"]
    assert sorted(heatmap_classifiers(tmp_path, guide, "all")) == ["classifier", "classifier_sn", "plain_seed1",
                                                                   "plain_seed2"]


def test_guidance_at_the_mean_is_its_own_run(tiny_run):
    args = ("--run", tiny_run, "--lambdas", "30,30", "--num-samples", "3", "--sample-steps", "3")
    run("sample.py", *args, "--guide-at", "mean")
    out = tiny_run / "samples" / "classifier30-30_steps3_atmean_n3_seed0"
    assert json.loads((out / "report.json").read_text())["guide_at"] == "mean"
    run("sample.py", *args)
    at_xt = np.load(tiny_run / "samples" / "classifier30-30_steps3_n3_seed0" / "samples.npz")["arr_0"]
    assert not np.array_equal(np.load(out / "samples.npz")["arr_0"], at_xt)


def test_guidance_interval_is_the_runs_unless_given(tiny_run):
    args = ("--run", tiny_run, "--lambdas", "30,30", "--num-samples", "2", "--sample-steps", "2")
    run("sample.py", *args, "--guide-t-min", "0")
    out = tiny_run / "samples" / "classifier30-30_steps2_from0_n2_seed0"
    assert json.loads((out / "report.json").read_text())["guide_t_min"] == 0
    proc = run("sample.py", *args)
    assert "at t >= 1500" in proc.stdout
    report = json.loads((tiny_run / "samples" / "classifier30-30_steps2_n2_seed0" / "report.json").read_text())
    assert report["guide_t_min"] == 1500


def test_edits_and_old_runs_guide_every_step_unless_told():
    from sample_flags import guide_t_min_default
    assert guide_t_min_default({"guide_t_min": 1500}) == 1500
    assert guide_t_min_default({"guide_t_min": 1500}, edit=True) == 0     # App. N: --t-fraction is the window
    assert guide_t_min_default({}) == 0                                   # a run from before the setting


def test_same_seed_same_samples_and_new_folder_each_run(tiny_run):
    args = ("--run", tiny_run, "--num-samples", "3", "--sample-steps", "3", "--name", "det")
    run("sample.py", *args)
    run("sample.py", *args)
    a = np.load(tiny_run / "samples" / "det" / "samples.npz")["arr_0"]
    b = np.load(tiny_run / "samples" / "det-2" / "samples.npz")["arr_0"]
    assert np.array_equal(a, b)
    assert json.loads((tiny_run / "samples" / "det" / "report.json").read_text())["batch_size"] == (
        256 if torch.cuda.is_available() else 64)                                          # the device's default


@pytest.mark.parametrize("args,message", [
    (["--lambdas", "30"], "--lambdas"),
    (["--lambdas", "abc"], "--lambdas"),
    (["--lambdas", "30,,30"], "--lambdas"),
    (["--lambdas", "nan,30"], "--lambdas"),
    (["--classifier", "nosuch", "--lambdas", "30,30"], "no checkpoint"),
    (["--sample-steps", "0"], "--sample-steps"),
    (["--lambdas", "30,30", "--ddim", "--guide-at", "mean"], "--guide-at"),
    (["--guide-at", "mean"], "--guide-at"),
    (["--lambdas", "30,30", "--guide-t-min", "-1"], "--guide-t-min"),
    (["--lambdas", "30,30", "--guide-t-min", "4001"], "--guide-t-min"),
    (["--guide-t-min", "500"], "--guide-t-min"),
    (["--quality"], "--quality compares each sample with its 3 nearest"),
    (["--interpolate", "--ddim"], "drop --ddim"),
    (["--edit", "--lambdas", "30,30", "--eta", "0.5"], "drop --eta"),
    (["--name", "../escape"], "--name"),
])
def test_sample_bad_input_is_one_line_exit_2(tiny_run, args, message):
    proc = run("sample.py", "--run", tiny_run, "--num-samples", "2", *args, ok=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_sample_missing_or_corrupt_run(tmp_path, tiny_run):
    proc = run("sample.py", "--run", tmp_path / "nope", ok=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    proc = run("sample.py", "--run", bad, ok=False)
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr
    (bad / "ddpm.pt").write_bytes((tiny_run / "ddpm.pt").read_bytes()[:5000])   # truncated
    proc = run("sample.py", "--run", bad, ok=False)
    assert proc.returncode == 2 and "not a readable checkpoint" in proc.stderr
    assert not (bad / "samples").exists()


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_with_code_is_refused(tmp_path):
    bad = tmp_path / "evil"
    bad.mkdir()
    torch.save({"config": {}, "model": Evil()}, bad / "ddpm.pt")
    proc = run("sample.py", "--run", bad, ok=False)
    assert proc.returncode == 2 and "refused" in proc.stderr and "pwned" not in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["--data", "nosuch"], "--data"),
    (["--data", "folder"], "--data-dir"),
    (["--data", "folder", "--data-dir", "/nonexistent"], "does not exist"),
    (["--image-size", "16", "--radius", "3"], "no room for a disc at both borders"),
])
def test_train_bad_input_is_one_line_exit_2(tmp_path, args, message):
    proc = run("train.py", "--out", tmp_path / "x", "--steps", "1", *args, ok=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_train_refuses_to_overwrite_without_resume(tiny_run):
    proc = run("train.py", *TINY, "--out", tiny_run, "--steps", "6", ok=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr


def test_inversion_to_the_whole_chain_reaches_the_last_kept_timestep(tiny_run):
    """--t-fraction 1 on a 4-step chain: respaced index 3 = K-1, original t = T-1 = 3999 (not index 4 = K)."""
    run("sample.py", "--run", tiny_run, "--interpolate", "--t-fraction", "1", "--sample-steps", "4", "--points", "2",
        "--name", "interp_full")
    run("sample.py", "--run", tiny_run, "--edit", "--lambdas", "0,30", "--t-fraction", "1", "--sample-steps", "4",
        "--num-samples", "2", "--name", "edit_full")
    for name in ("interp_full", "edit_full"):
        report = json.loads((tiny_run / "samples" / name / "report.json").read_text())
        assert (report["t_stop"], report["t_stop_original"]) == (3, 3999), name


@pytest.mark.parametrize("ddim", [False, True])
def test_one_sampling_step_goes_from_pure_noise_to_images(tiny_run, ddim):
    name = f"one_step_{ddim}"
    run("sample.py", "--run", tiny_run, "--sample-steps", "1", "--num-samples", "2", "--name", name, *(["--ddim"] * ddim))
    out = tiny_run / "samples" / name
    assert np.load(out / "samples.npz")["arr_0"].shape == (2, 16, 16, 3)
    assert json.loads((out / "report.json").read_text())["steps"] == 1


@pytest.mark.parametrize("args,message", [
    (["--interpolate", "--sample-steps", "1"], "--sample-steps 2 or more"),
    (["--edit", "--lambdas", "0,30", "--sample-steps", "1"], "--sample-steps 2 or more"),
    (["--interpolate", "--t-fraction", "0"], "--t-fraction"),
    (["--edit", "--lambdas", "0,30", "--t-fraction", "1.01"], "--t-fraction"),
])
def test_impossible_inversion_is_refused_before_any_work(tiny_run, args, message):
    proc = run("sample.py", "--run", tiny_run, "--num-samples", "2", "--name", "refused", *args, ok=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tiny_run / "samples" / "refused").exists()


def leftovers(run_dir):
    return sorted(p.name for p in run_dir.iterdir() if ".partial" in p.name)


@pytest.mark.parametrize("mode", [["--num-samples", "2"], ["--interpolate", "--points", "2", "--sample-steps", "2"]])
def test_failed_sampling_leaves_no_folder_and_overwrite_replaces_whole(tiny_run, monkeypatch, mode):
    """Any failure after sampling started (here: the report cannot be written) leaves neither an empty nor a
    half-written sample folder; --overwrite swaps the old folder for the new one only once it is complete."""
    from appendix import inversion
    import sample

    def broken(*args, **kwargs):
        raise OSError("disk full")

    args = ["--run", str(tiny_run), "--sample-steps", "2", *mode]
    with monkeypatch.context() as m:
        m.setattr(sample, "write_report", broken)
        m.setattr(inversion, "write_report", broken)
        with pytest.raises(OSError, match="disk full"):
            sample.main([*args, "--name", "broken"])
    assert not (tiny_run / "samples" / "broken").exists() and leftovers(tiny_run) == []

    name = "replaced_inversion" if "--interpolate" in mode else "replaced"
    old = tiny_run / "samples" / name
    old.mkdir(parents=True)
    (old / "stale.txt").write_text("from an earlier run")
    with monkeypatch.context() as m:
        m.setattr(sample, "write_report", broken)
        m.setattr(inversion, "write_report", broken)
        with pytest.raises(OSError):
            sample.main([*args, "--name", name, "--overwrite"])
    assert sorted(p.name for p in old.iterdir()) == ["stale.txt"]        # a failed overwrite keeps the old folder
    assert sample.main([*args, "--name", name, "--overwrite"]) == old
    assert not (old / "stale.txt").exists() and (old / "report.json").exists() and leftovers(tiny_run) == []


TINY_NO_SAMPLE_STEPS = ["--data", "circles", "--image-size", "16", "--model-channels", "8", "--classifier-width", "8"]


@pytest.mark.parametrize("args,message", [
    # the cpu preset samples 64 steps after training, more than a 32-step chain has
    (TINY_NO_SAMPLE_STEPS + ["--diffusion-steps", "32", "--steps", "3", "--classifier-steps", "3"], "--sample-steps"),
    (TINY + ["--arch", "dit", "--dit-patch", "3"], "patch size"),
    (TINY + ["--model-channels", "6", "--attention-resolutions", "16"], "heads"),
])
def test_train_flag_combinations_fail_before_the_run_folder_exists(tmp_path, args, message):
    proc = run("train.py", *args, "--out", tmp_path / "new" / "run", ok=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "new").exists()


@pytest.mark.parametrize("args,message", cases("""
    --diffusion-steps 3 => --sample-steps 4 must be in 1..3
    --sample-steps 0 => --sample-steps 0
    --diffusion-steps 0 => --diffusion-steps
    --diffusion-steps 32 --guide-t-min 33 => --guide-t-min
    --eval-samples -1 => --eval-samples
    --log-every 0 => --log-every
    --ckpt-every 0 => --ckpt-every
    --ema 1 => --ema
    --lr -1 => --lr
    --classifier-lr 0 => --classifier-lr
    --vb-scale -1 => --vb-scale
    --radius 0 => --radius
    --delta 0 => --delta
    --resume --overwrite => --resume
    --arch dit --dit-heads 3 => num_heads
    --channel-mult 1,2,2,2,2,2 => not divisible by 32
    --what evaluator => --data celeba
    --what ddpm --overlap => --overlap
    --what classifier --overlap => --overlap
    --image-size 18 => not divisible
    --batch-size 0 => --batch-size
    --lr-decay 1.5 => --lr-decay
    --classifier-intensity -0.1 => --classifier-intensity
    --guide-t-min 4001 => --guide-t-min
    --data-seed -1 => --data-seed
    --classifier-name ../outside => --classifier-name
    --data sizes --mirror-equivariant => --mirror-equivariant
    --top-k 0,5 => --top-k set the App. D filter: add --what filter
    --stage1 evaluator --tau1 5 --train-size 3 => --stage1 --tau1 --train-size set the App. D filter
    --variance large --vb-scale 5 => --variance large has none: drop --vb-scale
    --data mnist --classifier-crop-scale 1,1.25 => mnist labels the stroke thickness
    --data mnist --mirror-equivariant => mnist labels do not swap
    --data mnist --delta 0.7 => the share of digits at each end
    --data mnist --what filter => --what filter needs --data celeba
    --what evaluator => or mnist (the digit classifier)
    --data mnist --data-dir /nonexistent/mnist => MNIST folder /nonexistent/mnist does not exist
"""))
def test_every_flag_combination_is_checked_in_one_place_before_any_work(tmp_path, monkeypatch, capsys, args, message):
    import train
    monkeypatch.setattr(train.signal, "signal", lambda *a: None)        # keep pytest's own signal handlers
    monkeypatch.setattr(train, "training_sets", lambda *a: pytest.fail("read the data before checking the flags"))
    with pytest.raises(SystemExit) as exit_:
        train.main([*TINY, "--steps", "1", "--out", str(tmp_path / "new" / "run"), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("checkpoint", [False, True])
def test_failed_training_removes_the_new_run_folder_unless_it_can_resume(tmp_path, monkeypatch, checkpoint):
    import train

    def crash(config, out, *args, **kwargs):
        (out / "ddpm_loss.csv").write_text("1,0.5\n")
        if checkpoint:
            (out / "ddpm.pt").write_bytes(b"a checkpoint")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(train.signal, "signal", lambda *a: None)
    monkeypatch.setattr(train, "train_ddpm", crash)
    with pytest.raises(RuntimeError, match="out of memory"):
        train.main([*TINY, "--steps", "1", "--out", str(tmp_path / "new" / "run")])
    assert (tmp_path / "new" / "run" / "ddpm.pt").exists() if checkpoint else not (tmp_path / "new").exists()


@pytest.mark.parametrize("variance,small", [("small", True), ("large", False)])
def test_fixed_variance_run_trains_on_l_simple_and_samples(tmp_path, variance, small):
    out = tmp_path / "fixed"
    run("train.py", *TINY, "--out", out, "--steps", "2", "--what", "ddpm", "--variance", variance)
    run_config = json.loads((out / "config.json").read_text())
    assert run_config["diffusion"]["learn_sigma"] is False and run_config["diffusion"]["sigma_small"] is small
    assert run_config["unet"]["out_channels"] == 3
    vb = np.loadtxt(out / "ddpm_loss.csv", delimiter=",", usecols=3)
    assert np.all(vb == 0)
    run("sample.py", "--run", out, "--num-samples", "2", "--name", "s")
    assert np.load(out / "samples" / "s" / "samples.npz")["arr_0"].shape == (2, 16, 16, 3)


def test_lambda_sweep_collects_each_report_and_plots(tiny_run):
    proc = run("scripts/sweep.py", "--run", tiny_run, "--lambdas", "0,30", "--num-samples", "3", "--name", "t",
               "--sample-args", "--sample-steps 2")
    rows = json.loads((tiny_run / "sweeps" / "t" / "sweep.json").read_text())["rows"]
    assert [r["lambda"] for r in rows] == [0.0, 30.0]
    for r in rows:
        report = json.loads((Path(r["folder"]) / "report.json").read_text())
        assert r["accuracy_middle"] == report["accuracy_middle"] and r["zero_or_multi"] == report["zero_or_multi"]
    assert json.loads((Path(rows[1]["folder"]) / "report.json").read_text())["lambdas"] == "[[30.0, 30.0]]"
    assert (tiny_run / "sweeps" / "t" / "sweep.png").stat().st_size > 0 and "| 30 |" in proc.stdout
    assert f"torch {torch.__version__}; sampling seed 0" in (tiny_run / "sweeps" / "t" / "sweep.md").read_text()


@pytest.mark.parametrize("lambdas", ["a,b", "-1,30", "nan"])
def test_sweep_bad_lambdas_is_one_line_exit_2(tiny_run, lambdas):
    proc = run("scripts/sweep.py", "--run", tiny_run, f"--lambdas={lambdas}", ok=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--lambdas" in proc.stderr


def test_cpu_preset_circles_run_uses_dc_correction_and_mirror_head_and_both_can_be_turned_off(tiny_run, tmp_path):
    run_config = json.loads((tiny_run / "config.json").read_text())
    assert run_config["dc_correction"] is True and len(run_config["dc_prior"]["mean"]) == 3 and max(run_config["dc_prior"]["var"]) < 1e-12
    assert json.loads((tiny_run / "classifier.json").read_text())["classifier"]["mirror_equivariant"] is True
    args = ("--run", tiny_run, "--lambdas", "30,30", "--num-samples", "2", "--sample-steps", "3")
    run("sample.py", *args, "--name", "dc_on")
    on = json.loads((tiny_run / "samples" / "dc_on" / "report.json").read_text())
    run("sample.py", *args)   # the default folder name has no tag; turning it off adds one
    run("sample.py", *args, "--no-dc-correction")
    off = json.loads((tiny_run / "samples" / "classifier30-30_steps3_nodc_n2_seed0" / "report.json").read_text())
    assert on["dc_correction"] is True and off["dc_correction"] is False
    paper = tmp_path / "paper_head"
    run("train.py", *TINY, "--out", paper, "--steps", "2", "--classifier-steps", "2", "--eval-samples", "0",
        "--no-mirror-equivariant", "--no-dc-correction")
    assert json.loads((paper / "config.json").read_text())["dc_correction"] is False
    assert json.loads((paper / "classifier.json").read_text())["classifier"]["mirror_equivariant"] is False


def test_lr_schedule_constant_then_linear_to_zero():
    from train import lr_at
    assert [lr_at(s, 10, 1.0) for s in range(10)] == [1.0] * 10                  # the paper: constant
    lrs = [lr_at(s, 10, 1.0, decay=0.4) for s in range(10)]
    assert lrs[:6] == [1.0] * 6 and lrs[6:] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] > 0


def test_training_uses_the_decayed_lr_of_its_last_step(tmp_path):
    from train import lr_at
    out = tmp_path / "lr"
    run("train.py", *TINY, "--out", out, "--steps", "5", "--what", "ddpm", "--eval-samples", "0",
        "--lr", "1e-3", "--lr-decay", "0.4")
    state = torch.load(out / "ddpm.pt", weights_only=True)
    assert state["config"]["train"]["lr_decay"] == 0.4
    assert state["opt"]["param_groups"][0]["lr"] == pytest.approx(lr_at(4, 5, 1e-3, 0.4)) == pytest.approx(5e-4)


@pytest.mark.parametrize("amp", [False, True])   # the DDPM's precision; the classifier trains in fp32 always
def test_classifier_beside_the_ddpm_trains_the_same_weights_as_one_after_the_other(tmp_path, amp):
    import os
    env = dict(os.environ, OMP_NUM_THREADS="1")   # same threads in both runs: float rounding depends on them
    steps = ("--steps", "5", "--classifier-steps", "4", "--eval-samples", "0", "--amp" if amp else "--no-amp")
    together, apart = tmp_path / "together", tmp_path / "apart"

    def train(*args):
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *for_what([*TINY, *steps, *args])],
                              capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    out = train("--out", together, "--overlap", "--device", "cpu").stdout          # a CPU feature
    assert "[classifier] step 4/4" in out and "[ddpm] step 5/5" in out
    assert json.loads((together / "config.json").read_text())["train"]["overlap_steps"] == round(0.85 * 4)
    train("--out", apart, "--what", "ddpm", "--device", "cpu")
    train("--out", apart, "--what", "classifier", "--device", "cpu")
    for name in ("ddpm", "classifier"):
        a, b = (torch.load(d / f"{name}.pt", weights_only=True) for d in (together, apart))
        assert a["step"] == b["step"] and set(a["model"]) == set(b["model"])
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name
    assert (together / "classifier_heatmap.png").exists() and (together / "classifier.json").exists()
    if amp:
        return
    default = tmp_path / "default"
    train("--out", default)   # one thread: nothing to split, one after the other
    assert json.loads((default / "config.json").read_text())["train"]["overlap_steps"] == 0


def test_spectral_norm_classifier_is_saved_within_its_bound(tiny_run, tmp_path):
    """train.py --spectral-norm: every normalised layer of the saved classifier has σ_max = the Lipschitz factor
    (a power iteration whose u came from the previous v left layers at 2-10x the factor)."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(tiny_run / "config.json", out / "config.json")
    run("train.py", *TINY, "--what", "classifier", "--spectral-norm", "--classifier-steps", "40", "--out", out)
    model, _ = ckpt_io.load_classifier(out / "classifier_sn.pt")
    sigmas = spectral_norm_sigmas(model)
    assert len(sigmas) > 10
    assert max(sigmas.values()) <= 0.5 * (1 + 1e-3) and min(sigmas.values()) >= 0.5 * (1 - 1e-3), sigmas


@pytest.mark.parametrize("script,flags", [("train.py", ["--stage1", "nope"]), ("sample.py", ["--sample-steps", "x"]),
                                          ("scripts/repeat.py", ["--seeds", "x"]), ("scripts/sweep.py", ["--bogus"]),
                                          ("scripts/bench.py", ["--modes"]), ("scripts/gpu_check.py", ["--stage-timeout", "x"])])
def test_a_bad_flag_is_one_line_in_every_entry_point(script, flags):
    proc = run(script, *flags, ok=False)
    name = f"python -m {script[:-3].replace('/', '.')}" if "/" in script else script    # as README runs it
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "usage" not in proc.stderr
    assert proc.stderr.startswith(f"{name}: error: ") and f"(see {name} --help)" in proc.stderr
