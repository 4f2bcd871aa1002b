"""classifier.py: spectral-norm bound, temperature-scaling recovery, ECE, the noisy training loss."""
import pytest
import torch
import torch.nn.functional as F

from classifier import (ClassifierConfig, calibrate, expected_calibration_error, fit_temperature,
                        noisy_classifier_loss, spectral_norm_sigmas)
from ddpm import DiffusionConfig

SMALL = dict(image_size=16, model_channels=16, num_res_blocks=1, attention_resolutions=(8,), channel_mult=(1, 2, 2),
             num_head_channels=16)


@pytest.mark.parametrize("lipschitz", [0.5, 1.0])
def test_spectral_norm_bounds_every_normalised_weight(lipschitz):
    torch.manual_seed(0)
    model = ClassifierConfig(**SMALL, spectral_norm=True, lipschitz=lipschitz).build()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, t, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4000, (8,)), torch.randint(0, 2, (8,))
    for _ in range(30):   # training forwards run the power iteration and move the weights
        loss = F.cross_entropy(model(x, t), y)
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad():   # let the power iteration converge on the final weights (as training does)
        for _ in range(100):
            model(x, t)
    model.eval()
    sigmas = spectral_norm_sigmas(model)
    assert len(sigmas) > 10
    nonzero = {k: s for k, s in sigmas.items() if s > 0}
    assert len(nonzero) == len(sigmas)          # zero-initialised layers got normalised too
    assert max(nonzero.values()) <= lipschitz * 1.02


def test_spectral_norm_is_rebuilt_from_config_and_state():
    torch.manual_seed(0)
    cfg = ClassifierConfig(**SMALL, spectral_norm=True, lipschitz=0.7)
    a = cfg.build().eval()
    b = cfg.build().eval()
    b.load_state_dict(a.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 100])
    torch.testing.assert_close(a(x, t), b(x, t))


def test_temperature_scaling_recovers_a_known_temperature():
    torch.manual_seed(0)
    true_logits = torch.randn(20000, 3) * 2.0
    labels = torch.distributions.Categorical(logits=true_logits).sample()
    for t_true in (0.5, 1.0, 2.5):
        assert fit_temperature(true_logits * t_true, labels) == pytest.approx(t_true, rel=0.05)


def test_calibration_moves_ece_down_and_stores_t():
    torch.manual_seed(1)
    true_logits = torch.randn(5000, 2) * 3.0
    labels = torch.distributions.Categorical(logits=true_logits).sample()
    model = ClassifierConfig(**SMALL).build()
    report = calibrate(model, true_logits * 3.0, labels)    # an over-confident model
    assert report["temperature"] == pytest.approx(3.0, rel=0.1)
    assert report["ece_after"] < report["ece_before"] / 3
    assert model.temperature.item() == pytest.approx(report["temperature"])


def test_ece_of_perfectly_calibrated_and_overconfident():
    probs = torch.tensor([[1.0, 0.0]] * 10)
    assert expected_calibration_error(probs, torch.zeros(10, dtype=torch.long)) == pytest.approx(0.0)
    assert expected_calibration_error(probs, torch.ones(10, dtype=torch.long)) == pytest.approx(1.0)


def test_noisy_loss_uses_the_chain_and_returns_logits():
    torch.manual_seed(0)
    d = DiffusionConfig(num_steps=100).build()
    seen = {}

    def clf(x, t):
        seen["t"] = t
        return torch.zeros(x.shape[0], 2, requires_grad=True)

    loss, logits = noisy_classifier_loss(clf, d, torch.zeros(64, 3, 4, 4), torch.zeros(64, dtype=torch.long))
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert seen["t"].min() >= 0 and seen["t"].max() < 100 and seen["t"].dtype == torch.long


def test_mirror_equivariant_head_swaps_the_classes_of_a_flipped_image():
    torch.manual_seed(0)
    model = ClassifierConfig(**SMALL, mirror_equivariant=True).build().eval()
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([0, 10, 2000, 3999])
    with torch.no_grad():
        logits, flipped = model(x, t), model(x.flip(-1), t)
        symmetric = model(x + x.flip(-1), t).softmax(-1)
    torch.testing.assert_close(flipped, logits.flip(-1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits[:, 0], logits[:, 1])
    torch.testing.assert_close(symmetric, torch.full_like(symmetric, 0.5))
    plain = ClassifierConfig(**SMALL).build().eval()
    with torch.no_grad():
        assert not torch.allclose(plain(x.flip(-1), t), plain(x, t).flip(-1), atol=1e-4)
    with pytest.raises(ValueError, match="swaps 2 classes"):
        ClassifierConfig(**dict(SMALL, num_classes=4), mirror_equivariant=True).build()
