"""train.py's training loop: the EMA of the weights (ema <- r·ema + (1 - r)·θ after every optimizer step, by hand),
resuming in another precision, and the loss log of a resumed run."""
import numpy as np
import pytest
import torch

from infra import checkpoint as ckpt_io
import train
from data import Batches


def test_ema_update_is_rate_times_ema_plus_one_minus_rate_times_the_parameter():
    ema = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([[4.0]])]
    params = [torch.tensor([3.0, 2.0, 0.5]), torch.tensor([[0.0]])]
    train.ema_update(ema, params, 0.75)
    # 0.75·1 + 0.25·3 = 1.5, 0.75·(-2) + 0.25·2 = -1, 0.5 stays, 0.75·4 + 0.25·0 = 3 (all exact in binary)
    assert ema[0].tolist() == [1.5, -1.0, 0.5] and ema[1].tolist() == [[3.0]]
    assert params[0].tolist() == [3.0, 2.0, 0.5] and params[1].tolist() == [[0.0]]    # θ untouched
    train.ema_update(ema, params, 0.5)
    assert ema[0].tolist() == [2.25, 0.5, 0.5] and ema[1].tolist() == [[1.5]]


def test_fit_keeps_the_ema_recursion_of_the_weights_it_trained(tmp_path):
    """Rate 0.75, 3 steps from θ0: ema = 0.75³ θ0 + 0.75²·0.25 θ1 + 0.75·0.25 θ2 + 0.25 θ3, with θk the weights
    after step k (recorded by the loss function, which sees θ0, θ1, θ2 before each step)."""
    images = np.random.default_rng(0).integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
    batches = Batches(images, np.zeros(8, dtype=np.int64), 4, seed=0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 1))
    thetas = []

    def loss_fn(net, x, y, gen, part):
        thetas.append([p.detach().clone() for p in net.parameters()])
        return net(x).pow(2).mean(), {}

    model, ema = train.fit("ddpm", model, loss_fn, batches, steps=3, lr=1e-2, ema_rate=0.75, amp=False,
                           device=torch.device("cpu"), path=tmp_path / "m.pt", config={"seed": 0}, resume=False)
    thetas.append([p.detach() for p in model.parameters()])
    assert len(thetas) == 4
    weights = [0.75 ** 3, 0.75 ** 2 * 0.25, 0.75 * 0.25, 0.25]
    for j, p_ema in enumerate(ema.parameters()):
        expected = sum(w * th[j].double() for w, th in zip(weights, thetas))
        torch.testing.assert_close(p_ema.double(), expected, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(thetas[0][j], thetas[3][j])      # the weights did move


def tiny_fit(path, steps, *, amp=False, resume=False, ckpt_every=500, loss_fn=None):
    """fit on 4x4 images with a linear model, batch 4, every step logged; seeded, so runs repeat bitwise."""
    images = np.random.default_rng(0).integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
    batches = Batches(images, np.zeros(8, dtype=np.int64), 4, seed=0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 1))
    loss_fn = loss_fn or (lambda net, x, y, gen, part: (net(x).float().pow(2).mean(), {}))
    path.parent.mkdir(exist_ok=True)
    return train.fit("ddpm", model, loss_fn, batches, steps=steps, lr=1e-2, ema_rate=0.5, amp=amp,
                     device=torch.device("cpu"), path=path, config={"seed": 0}, resume=resume, log_every=1,
                     ckpt_every=ckpt_every)


def same_state(a, b):
    """Nested state dicts equal: the same keys, and tensors equal bitwise."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("amp_before,amp_after", [(False, True), (True, False), (True, True)])
def test_resuming_in_another_or_the_same_precision_continues_the_saved_state(tmp_path, monkeypatch, amp_before,
                                                                             amp_after):
    """config.check_resume lets --resume change the precision. A checkpoint saved with AMP off holds scaler = {},
    which an enabled GradScaler refused ("The source state dict is empty", lightweight-gan issue 103): on CUDA,
    AMP off -> on crashed. Here on the CPU with the scaler forced on whenever AMP is (as fit builds it on CUDA)."""
    monkeypatch.setattr(train, "grad_scaler", lambda device, amp: torch.amp.GradScaler("cpu", enabled=amp))
    path = tmp_path / "m.pt"
    tiny_fit(path, 2, amp=amp_before)
    saved = torch.load(path, weights_only=True)
    assert (saved["scaler"] == {}) is (not amp_before)            # a disabled scaler saves nothing
    tiny_fit(path, 2, amp=amp_after, resume=True)   # no step left: loads, then saves what it holds
    again = torch.load(path, weights_only=True)
    assert again["step"] == 2
    for key in ("model", "ema", "opt", "rng"):
        assert same_state(saved[key], again[key]), key
    # a fresh scale after AMP off -> on (GradScaler's initial 2^16), none kept after AMP on -> off, the saved one
    # (2^16 and 2 steps towards growing it) when AMP stays on
    fresh = {"scale": 2.0 ** 16, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000}
    assert again["scaler"] == (dict(fresh, _growth_tracker=2 if amp_before else 0) if amp_after else {})
    model, _ = tiny_fit(path, 3, amp=amp_after, resume=True)      # and it trains on in the new precision
    after = torch.load(path, weights_only=True)
    assert after["step"] == 3 and not same_state(saved["model"], after["model"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def log_rows(path):
    return [line.split(",") for line in path.read_text().splitlines()]


@pytest.mark.parametrize("stop", ["crash", "failed save"])
def test_a_resumed_run_logs_each_step_once(tmp_path, monkeypatch, stop):
    """Killed (here: an exception) or stopped by a failed checkpoint write between checkpoints, a run resumed from
    its last checkpoint once logged the steps after it twice (`... 4 5 4 5 6`, openmm_workshops issue 10). The log
    is cut back to the checkpoint's step: each step once, and the same numbers as a run never stopped."""
    whole = tmp_path / "whole" / "m.pt"
    tiny_fit(whole, 8, ckpt_every=3)
    path = tmp_path / "stopped" / "m.pt"
    calls = []

    def crashing(net, x, y, gen, part):
        calls.append(1)
        if stop == "crash" and len(calls) == 6:
            raise RuntimeError("killed")                              # after step 5, the checkpoint at step 3
        return net(x).float().pow(2).mean(), {}

    real_save = ckpt_io.save_atomic

    def failing_save(obj, p):
        if stop == "failed save" and obj["step"] == 6:
            raise OSError(28, "No space left on device")              # the checkpoint stays at step 3
        real_save(obj, p)

    monkeypatch.setattr(ckpt_io, "save_atomic", failing_save)
    with pytest.raises(RuntimeError if stop == "crash" else OSError):
        tiny_fit(path, 8, ckpt_every=3, loss_fn=crashing)
    assert torch.load(path, weights_only=True)["step"] == 3
    before = log_rows(path.with_name("m_loss.csv"))
    assert [int(r[0]) for r in before] == list(range(1, 6 if stop == "crash" else 7))
    monkeypatch.setattr(ckpt_io, "save_atomic", real_save)              # the disk has room again
    tiny_fit(path, 8, ckpt_every=3, resume=True)
    rows = log_rows(path.with_name("m_loss.csv"))
    assert [int(r[0]) for r in rows] == list(range(1, 9))                  # 1..8, each once
    assert rows[:3] == before[:3]                                          # up to the checkpoint: kept as written
    assert [r[:-1] for r in rows] == [r[:-1] for r in log_rows(whole.with_name("m_loss.csv"))]   # all but the rate


def test_the_log_is_cut_at_the_checkpoint_and_a_half_written_row_dropped(tmp_path):
    log = tmp_path / "m_loss.csv"
    log.write_bytes(b"1,0.5,9\r\n2,0.4,9\r\n3,0.3,9\r\n2,0.41,9\r\n3,0.31,9\r\n4,0.2,9\r\n5,0.")
    ckpt_io.truncate_log(log, 3)        # an older resume repeated 2, 3: the later rows are the trained ones
    assert log.read_bytes() == b"1,0.5,9\r\n2,0.41,9\r\n3,0.31,9\r\n"
    ckpt_io.truncate_log(tmp_path / "none.csv", 3)                      # no log yet: nothing to do
    assert not (tmp_path / "none.csv").exists()
