"""torchrun with 2 CPU processes (gloo) takes the same steps as one process on the same global batch."""
import subprocess
import sys

import numpy as np
import torch

from test_cli import ROOT, TINY, run, tiny_run  # noqa: F401


def test_two_process_ddp_matches_one_process(tmp_path):
    # The mirror-equivariant head leaves some gradients exactly 0 by symmetry (e.g. b_0 + b_1 of the last layer);
    # Adam turns their ~1e-9 rounding noise, which depends on the summation order, into ±lr steps: plain head here.
    common = [*TINY, "--steps", "3", "--classifier-steps", "2", "--batch-size", "8", "--classifier-batch-size", "8",
              "--eval-samples", "0", "--no-mirror-equivariant", "--device", "cpu"]   # gloo, also on GPU machines
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run("train.py", *common, "--out", single)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train.py"), *common, "--out", str(ddp)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parameters identical on all 2 ranks" in proc.stdout       # checked with all-reduce min == max
    assert proc.stdout.count("[ddpm] step 3/3") == 1                   # rank 0 alone logs
    for name in ("ddpm.pt", "classifier.pt"):
        a, b = (torch.load(d / name, weights_only=True) for d in (single, ddp))
        assert a["step"] == b["step"]
        # Adam moves every weight by ~lr (5e-4) per step, so a wrong gradient shows as ~1e-3 differences;
        # summation order across ranks leaves ~1e-5.
        for weights in ("model", "ema") if a["ema"] is not None else ("model",):
            for k in a[weights]:
                torch.testing.assert_close(b[weights][k], a[weights][k], rtol=1e-3, atol=1e-4)


def test_global_batch_must_split_evenly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train.py"), *TINY, "--steps", "1", "--batch-size", "7", "--device", "cpu",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode != 0 and "not divisible by the 2 processes" in proc.stderr


def test_sampling_sharded_over_two_processes_gives_the_same_samples(tiny_run):  # noqa: F811
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    common = ["--run-dir", str(tiny_run), "--lambdas", "30,30", "--num-samples", "5", "--batch-size", "2", "--sample-steps", "3",
              "--device", "cpu"]
    one = subprocess.run([sys.executable, str(ROOT / "sample.py"), *common, "--name", "one"], capture_output=True,
                         text=True, cwd=ROOT, timeout=300, env=env)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "sample.py"), *common, "--name", "two"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    a, b = (np.load(tiny_run / "samples" / n / "samples.npz")["arr_0"] for n in ("one", "two"))
    assert a.shape == b.shape == (5, 16, 16, 3)
    assert np.array_equal(a, b)                     # batch b's noise depends on (seed, b) only
    assert not (tiny_run / "samples" / "two-2").exists()              # rank 0 alone writes


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    # Seen on a 1-GPU machine: a 2-process torchrun put rank 1 on cuda:1, which does not exist.
    import pytest
    import device
    from cli import InputError
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(InputError, match="--nproc_per_node 1, or --device cpu"):
        device.setup_distributed(torch.device("cuda"))
