"""train.py's EMA of the weights: ema <- r·ema + (1 - r)·θ after every optimizer step, by hand."""
import numpy as np
import torch

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
