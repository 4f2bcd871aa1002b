"""Killed runs resume, a diverging run stops with its last good checkpoint intact, bad numbers are refused."""
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_cli import ROOT, TINY, run
from tiny_flags import for_what


def start_training(out, steps=100_000):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *for_what([*TINY, "--what", "ddpm"]), "--out",
                             str(out), "--steps", str(steps), "--eval-samples", "0", "--ckpt-every", "3",
                             "--log-every", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def wait_for_checkpoint(path, proc, min_step=3, timeout=120):
    """Block until `path` holds a checkpoint of at least `min_step` (atomic writes: always loadable)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.stderr.read()
        if path.exists() and torch.load(path, weights_only=True)["step"] >= min_step:
            return
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint at step >= {min_step} after {timeout}s")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_killed_training_resumes_from_its_checkpoint(tmp_path, sig):
    out = tmp_path / "run"
    proc = start_training(out)
    wait_for_checkpoint(out / "ddpm.pt", proc)
    proc.send_signal(sig)
    stdout, _ = proc.communicate(timeout=60)
    state = torch.load(out / "ddpm.pt", weights_only=True)     # intact whatever the signal
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert state["step"] % 3 == 0                          # the last periodic checkpoint
    else:                                                      # saved on the way out, at the current step
        assert proc.returncode == 130 and f"saved step {state['step']}" in stdout
    assert not list(out.glob("*.tmp*")) or sig == signal.SIGKILL
    target = state["step"] + 2
    step_of = lambda row: int(row.split(",")[0])
    before = (out / "ddpm_loss.csv").read_text().splitlines()
    resumed = run("train.py", *TINY, "--out", out, "--steps", target, "--what", "ddpm", "--eval-samples", "0",
                  "--resume", "--log-every", "1")
    assert f"at step {state['step']}" in resumed.stdout
    # the log goes on from the checkpoint, each step once, not `... 4 5 6 4 5` (a kill -9 between checkpoints)
    rows = (out / "ddpm_loss.csv").read_text().splitlines()
    assert [step_of(r) for r in rows] == list(range(1, target + 1))
    assert [r for r in rows if step_of(r) <= state["step"]] == [r for r in before if step_of(r) <= state["step"]]
    after = torch.load(out / "ddpm.pt", weights_only=True)
    assert after["step"] == target
    assert set(after["opt"]["state"]) and after["rng"]["loss"].dtype == torch.uint8
    assert any(not torch.equal(state["ema"][k], after["ema"][k]) for k in state["ema"])


def test_diverging_run_stops_and_keeps_a_finite_checkpoint(tmp_path):
    out = tmp_path / "nan"
    proc = run("train.py", *for_what([*TINY, "--what", "ddpm"]), "--out", out, "--steps", "200", "--eval-samples", "0",
               "--lr", "1e30", "--ckpt-every", "1", ok=False)
    assert proc.returncode == 2 and "not finite" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    state = torch.load(out / "ddpm.pt", weights_only=True)
    assert state["step"] < 200
    for weights in (state["model"], state["ema"]):
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "r"
    run("train.py", *TINY, "--out", out, "--steps", "1", "--classifier-steps", "1", "--eval-samples", "0")
    return out


@pytest.mark.parametrize("args,message", [
    (["--num-samples", "-5"], "--num-samples"),
    (["--batch-size", "0"], "--batch-size"),
    (["--eta", "-1", "--ddim"], "--eta"),
    (["--eta", "nan", "--ddim"], "--eta"),
    (["--lambdas", "30,inf"], "--lambdas"),
    (["--sample-steps", "-3"], "--sample-steps"),
])
def test_sample_bad_numbers_are_one_line_errors(small_run, args, message):
    out = small_run
    proc = run("sample.py", "--run", out, *args, ok=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (out / "samples").exists()


def test_ema_weights_stay_leaves_outside_the_autograd_graph(tmp_path):
    # The EMA update once ran with grad enabled: each step chained the EMA tensors to the model's parameters in
    # the autograd graph (one node per parameter per step, a leak over a 250k-step run).
    import numpy as np
    import torch
    import train
    from data import Batches
    images = np.random.default_rng(0).integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
    batches = Batches(images, np.zeros(8, dtype=np.int64), 4, seed=0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 1))
    seen = []                                 # the weights before each step: θ0, θ1, θ2

    def loss_fn(net, x, y, gen, part):
        seen.append([p.detach().clone() for p in net.parameters()])
        return net(x).pow(2).mean(), {}

    _, ema = train.fit("ddpm", model, loss_fn, batches, steps=3, lr=1e-2, ema_rate=0.5, amp=False,
                       device=torch.device("cpu"), path=tmp_path / "m.pt", config={"seed": 0}, resume=False)
    for j, (p_ema, p) in enumerate(zip(ema.parameters(), model.parameters())):
        assert p_ema.is_leaf and not p_ema.requires_grad and p_ema.grad_fn is None
        assert not torch.equal(p_ema, p)      # the EMA did move, and lags the model
        # three halvings from θ0: ema = θ0/8 + θ1/8 + θ2/4 + θ3/2
        expected = seen[0][j] / 8 + seen[1][j] / 8 + seen[2][j] / 4 + p.detach() / 2
        torch.testing.assert_close(p_ema, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stopping_a_run_with_the_classifier_beside_saves_both_and_resumes_both(tmp_path, sig):
    out = tmp_path / "run"
    big = ("--steps", "100000", "--classifier-steps", "100000", "--eval-samples", "0", "--overlap")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY, "--out", str(out), *big,
                             "--ckpt-every", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    wait_for_checkpoint(out / "ddpm.pt", proc)
    wait_for_checkpoint(out / "classifier.pt", proc)
    proc.send_signal(sig)   # to the DDPM process only; it stops the classifier's
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    ddpm, clf = (torch.load(out / f"{n}.pt", weights_only=True) for n in ("ddpm", "classifier"))
    assert f"[ddpm] interrupted: saved step {ddpm['step']}" in stdout
    assert f"[classifier] interrupted: saved step {clf['step']}" in stdout
    assert not list(out.glob("*.tmp*"))
    resumed = run("train.py", *TINY, "--out", out, "--steps", ddpm["step"] + 2, "--classifier-steps", clf["step"] + 2,
                  "--eval-samples", "0", "--overlap", "--resume")
    assert f"[ddpm] resumed from {out / 'ddpm.pt'} at step {ddpm['step']}" in resumed.stdout
    assert f"[classifier] resumed from {out / 'classifier.pt'} at step {clf['step']}" in resumed.stdout
    for name, before in (("ddpm", ddpm), ("classifier", clf)):
        assert torch.load(out / f"{name}.pt", weights_only=True)["step"] == before["step"] + 2


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_checkpoint_write_waits_until_the_file_is_complete(tmp_path, monkeypatch, sig):
    """Ctrl-C / SIGTERM in the middle of torch.save once broke the zip writer, so train.py crashed with exit 1
    instead of saving and exiting 130 (seen in the classifier-beside test above). The handler now runs after the
    rename: the checkpoint is whole, and no temporary file is left."""
    import os
    from infra import checkpoint
    events = []

    def handler(signum, frame):          # as train.py's: Ctrl-C and SIGTERM raise KeyboardInterrupt
        events.append("handler")
        raise KeyboardInterrupt

    real_save = torch.save

    def save_and_get_killed(obj, f):
        real_save(obj, f)                # the zip is written but not closed, fsync'ed or renamed
        os.kill(os.getpid(), sig)
        events.append("sent")

    monkeypatch.setattr(checkpoint.torch, "save", save_and_get_killed)
    old = signal.signal(sig, handler)
    try:
        state = {"model": {"w": torch.arange(100000.0)}, "config": {}, "step": 7}
        with pytest.raises(KeyboardInterrupt):
            checkpoint.save_atomic(state, tmp_path / "ddpm.pt")
        assert signal.getsignal(sig) is handler                     # the handler is back in place
    finally:
        signal.signal(sig, old)
    assert events == ["sent", "handler"]                            # delivered after the write, not during it
    assert torch.equal(checkpoint.load(tmp_path / "ddpm.pt")["model"]["w"], state["model"]["w"])
    assert not list(tmp_path.glob("*.tmp"))


def test_runs_saved_with_the_old_name_of_T_still_load(tmp_path):
    """Configs saved before T was named `diffusion_steps` (improved-diffusion's name) carry `num_steps`."""
    import json
    from infra import checkpoint
    from ddpm import DiffusionConfig
    old = {"diffusion": {"num_steps": 40, "schedule": "cosine", "learn_sigma": True, "sigma_small": False,
                         "vb_scale": 1.0}, "data": {"image_size": 16}}
    checkpoint.save_atomic({"kind": "ddpm", "config": old, "model": {}}, tmp_path / "ddpm.pt")
    (tmp_path / "config.json").write_text(json.dumps(old))
    for config in (checkpoint.load(tmp_path / "ddpm.pt")["config"], checkpoint.read_config(tmp_path / "config.json")):
        assert config["diffusion"]["diffusion_steps"] == 40 and "num_steps" not in config["diffusion"]
        assert DiffusionConfig(**config["diffusion"]).build().num_timesteps == 40


@pytest.mark.parametrize("args,message", [(["--lr", "0.1"], "train.lr 0.0005 -> 0.1"),
                                          (["--classifier-width", "4"], "classifier.model_channels 8 -> 4")])
def test_resume_refuses_other_settings_than_the_checkpoints(small_run, args, message):
    """--resume once trained on whatever the flags said (another lr, another data set) or crashed on a shape
    mismatch after loading the data; the saved settings must match, all but the steps."""
    proc = run("train.py", *TINY, "--out", small_run, "--resume", *args, ok=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args,message", [(["--seeds", "0"], "--seeds"), (["--lambdas", "30"], "--lambdas '30'")])
def test_repeat_refuses_bad_input_before_training_anything(small_run, args, message):
    before = sorted(p.name for p in small_run.iterdir())
    proc = run("scripts/repeat.py", "--run", small_run, *args, ok=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert sorted(p.name for p in small_run.iterdir()) == before          # no classifier trained, nothing sampled
