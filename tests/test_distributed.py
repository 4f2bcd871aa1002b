"""torchrun with 2 CPU processes (gloo) takes the same steps as one process on the same global batch, logs the same
numbers and skips a non-finite step on every rank; in fp32 and in bf16, whatever the host's default precision."""
import datetime
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train
from data import Batches
from test_cli import ROOT, TINY, run, tiny_run  # noqa: F401


def log_rtol(amp):
    """Relative tolerance of logged numbers of one run against another: the log's 5 significant digits in fp32;
    with bf16 autocast on, one bf16 rounding (2^-7), which roundings that differ between the runs can reach."""
    return torch.finfo(torch.bfloat16).eps if amp else 1e-4


def assert_weights_close(got, want, amp, lr, steps):
    """Weights after `steps` Adam steps of `lr` in two runs that differ in summation order only. Adam moves a weight
    by up to ~lr per step whatever its gradient's size, so a wrong gradient shows at ~lr. In fp32 the runs agree to
    far below that (~1e-5). With bf16 autocast each rank rounds its own gradient matmuls (2^-8 relative): over all
    weights the RMS difference stays within steps·lr·2^-7, but a weight whose gradient is ~0 (by symmetry, say) can
    take its Adam step the other way, so single weights are bounded by Adam's steps alone (measured on an AMX Xeon:
    1.5e-4 at lr 5e-4 after 3 steps; an RMS of 1e-6 on an AVX512-BF16 EPYC)."""
    if not amp:
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=1e-4)
        return
    diff = torch.cat([(got[k].double() - want[k].double()).flatten() for k in want if want[k].is_floating_point()])
    assert diff.abs().max() <= 2 * steps * lr and diff.pow(2).mean().sqrt() <= steps * lr * torch.finfo(
        torch.bfloat16).eps, (float(diff.abs().max()), float(diff.pow(2).mean().sqrt()))


def fit_rank(rank, world, folder, amp):
    """train.fit twice on 16 random 4x4 images, a linear 2-class classifier, global batch 8 split over `world` gloo
    processes, 4 steps of lr 1e-2: in folder/clean, and in folder/nan with the loss of the 2nd call NaN on the last
    rank only (in one process: the whole batch's). Each writes the calls made and the final weights (rank<r>.pt);
    rank 0 also the checkpoint and the loss log (m.pt, m_loss.csv)."""
    torch.set_num_threads(1)
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                                             world_size=world, timeout=datetime.timedelta(seconds=60))
    for name, nan_call in (("clean", None), ("nan", 2)):
        rng = np.random.default_rng(0)
        batches = Batches(rng.integers(0, 256, (16, 4, 4, 3), dtype=np.uint8), rng.integers(0, 2, 16), 8, seed=0)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2))
        calls = []

        def loss_fn(net, x, y, gen, part):
            calls.append(1)
            logits = net(x[part]).float()
            loss = F.cross_entropy(logits, y[part])
            if len(calls) == nan_call and rank == world - 1:
                loss = loss * float("nan")
            return loss, dict(acc=float((logits.argmax(1) == y[part]).float().mean()),
                              mse=float(logits.detach().pow(2).mean()))

        (folder / name).mkdir(exist_ok=True)
        model, ema = train.fit("ddpm", model, loss_fn, batches, steps=4, lr=1e-2, ema_rate=0.5, amp=amp,
                               device=torch.device("cpu"), path=folder / name / "m.pt", config={"seed": 0},
                               resume=False, log_every=1, dist=(rank, world))
        torch.save(dict(calls=len(calls), model=model.state_dict(), ema=ema.state_dict()),
                   folder / name / f"rank{rank}.pt")
    if world > 1:   # as train.main: a rank that tears gloo down alone can break the other's last collective
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("amp", [False, True])
def test_two_ranks_log_the_global_batch_and_skip_a_non_finite_step_together(tmp_path, amp):
    """Under torchrun rank 0 logged its own half of the batch (1.0409 where one process logs 1.0093; transformers
    PR 13681), and a loss that was NaN on one rank only made that rank alone skip its step: from then on the ranks
    paired backward passes of different batches, silently (Lightning issue 5243). The logged loss, accuracy and
    mse are the global batch's, as one process logs them, and both ranks skip the step (4 steps, 5 batches)."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    fit_rank(0, 1, one, amp)
    torch.multiprocessing.spawn(fit_rank, args=(2, two, amp), nprocs=2, join=True)
    for name, calls in (("clean", 4), ("nan", 5)):
        single, ranks = (torch.load(one / name / "rank0.pt"), [torch.load(two / name / f"rank{r}.pt") for r in (0, 1)])
        assert single["calls"] == ranks[0]["calls"] == ranks[1]["calls"] == calls, name
        rows = [np.loadtxt(d / name / "m_loss.csv", delimiter=",", ndmin=2) for d in (one, two)]
        assert rows[0][:, 0].tolist() == rows[1][:, 0].tolist() == [1, 2, 3, 4]
        np.testing.assert_allclose(rows[1][:, 1:4], rows[0][:, 1:4], rtol=log_rtol(amp), atol=1e-6,   # loss, acc, mse
                                   err_msg=name)
        for weights in ("model", "ema"):
            assert all(torch.equal(ranks[0][weights][k], v) for k, v in ranks[1][weights].items())   # in sync
            assert_weights_close(ranks[0][weights], single[weights], amp, 1e-2, 4)                   # as one process's


@pytest.mark.parametrize("amp", [False, True])   # whatever the host's default (bf16 on AMX / AVX512-BF16 CPUs)
def test_two_process_ddp_matches_one_process(tmp_path, amp):
    # The mirror-equivariant head leaves some gradients exactly 0 by symmetry (e.g. b_0 + b_1 of the last layer);
    # Adam turns their ~1e-9 rounding noise, which depends on the summation order, into ±lr steps: plain head here.
    common = [*TINY, "--steps", "3", "--classifier-steps", "2", "--batch-size", "8", "--classifier-batch-size", "8",
              "--eval-samples", "0", "--no-mirror-equivariant", "--device", "cpu",   # gloo, also on GPU machines
              "--amp" if amp else "--no-amp"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run("train.py", *common, "--out", single)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train.py"), *common, "--out", str(ddp)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parameters identical on all 2 ranks" in proc.stdout       # checked with all-reduce min == max
    assert proc.stdout.count("[ddpm] step 3/3") == 1                   # rank 0 alone logs
    for name in ("ddpm", "classifier"):
        a, b = (torch.load(d / f"{name}.pt", weights_only=True) for d in (single, ddp))
        assert a["step"] == b["step"]
        low = amp and name == "ddpm"               # the guidance classifier always trains in fp32
        for weights in ("model", "ema") if a["ema"] is not None else ("model",):
            assert_weights_close(b[weights], a[weights], low, a["config"]["train"]["lr"], a["step"])
        # the logged numbers are the global batch's (loss, mse, vb; loss, acc), not rank 0's half of it
        logs = [np.loadtxt(d / f"{name}_loss.csv", delimiter=",", ndmin=2) for d in (single, ddp)]
        assert logs[0][:, 0].tolist() == logs[1][:, 0].tolist() == ([2, 3] if name == "ddpm" else [2])
        np.testing.assert_allclose(logs[1][:, 1:-1], logs[0][:, 1:-1], rtol=log_rtol(low), atol=1e-6, err_msg=name)


def test_global_batch_must_split_evenly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train.py"), *TINY, "--steps", "1", "--batch-size", "7", "--device", "cpu",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode != 0 and "not divisible by the 2 processes" in proc.stderr


@pytest.mark.parametrize("amp", [False, True])   # whatever the host's default (bf16 on AMX / AVX512-BF16 CPUs)
def test_sampling_sharded_over_two_processes_gives_the_same_samples(tiny_run, amp):  # noqa: F811
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    common = ["--run-dir", str(tiny_run), "--lambdas", "30,30", "--num-samples", "5", "--batch-size", "2", "--sample-steps", "3",
              "--device", "cpu", "--amp" if amp else "--no-amp"]
    one = subprocess.run([sys.executable, str(ROOT / "sample.py"), *common, "--name", f"one{amp}"], capture_output=True,
                         text=True, cwd=ROOT, timeout=300, env=env)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "sample.py"), *common, "--name", f"two{amp}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    a, b = (np.load(tiny_run / "samples" / f"{n}{amp}" / "samples.npz")["arr_0"] for n in ("one", "two"))
    assert a.shape == b.shape == (5, 16, 16, 3)
    assert np.array_equal(a, b)                     # batch b's noise depends on (seed, b) only: the same batches
    assert not (tiny_run / "samples" / f"two{amp}-2").exists()        # rank 0 alone writes


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    # Seen on a 1-GPU machine: a 2-process torchrun put rank 1 on cuda:1, which does not exist.
    import pytest
    from infra import device
    from cli import InputError
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(InputError, match="--nproc_per_node 1, or --device cpu"):
        device.setup_distributed(torch.device("cuda"))
