"""unet.py and the classifier trunk: parameter counts of the official models, shapes, init, precision."""
import pytest
import torch

from classifier import ClassifierConfig
from infra.device import autocast
from unet import UNetConfig, count_parameters


def test_paper_unet_has_the_official_parameter_count():
    assert count_parameters(UNetConfig().build()) == 121_063_942        # docs/paper_notes.md §2.1


@pytest.mark.parametrize("width,attn,count", [(128, (32, 16, 8), 41_287_016), (64, (8,), 10_043_816)])
def test_classifier_trunk_has_the_official_parameter_count(width, attn, count):
    net_config = ClassifierConfig(model_channels=width, attention_resolutions=attn, num_classes=1000)  # §3.1
    assert count_parameters(net_config.build()) == count


@pytest.mark.parametrize("net_config", [
    dict(image_size=16, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,)),
    dict(image_size=32, model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(16, 8)),
    dict(image_size=32, model_channels=16, channel_mult=(1, 2, 2), resblock_updown=True, out_channels=3,
         use_scale_shift_norm=False, num_head_channels=8),
    dict(image_size=16, in_channels=1, out_channels=2, model_channels=8, channel_mult=(1, 1, 2), num_classes=3),
])
def test_unet_output_shapes(net_config):
    model = UNetConfig(**{**dict(num_res_blocks=1), **net_config}).build()
    c = net_config.get("in_channels", 3)
    x = torch.randn(2, c, net_config["image_size"], net_config["image_size"])
    y = torch.tensor([0, 2]) if net_config.get("num_classes") else None
    out = model(x, torch.tensor([0, 3999]), y=y)
    assert out.shape == (2, net_config.get("out_channels", 6), net_config["image_size"], net_config["image_size"])
    assert out.dtype == torch.float32
    assert out.abs().max() == 0                                   # zero-initialised output layer
    # with every weight non-zero: each example's output is the network's on that example alone (no mixing
    # across the batch in attention or normalisation), and its timestep and label reach the output
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    model.eval()
    with torch.no_grad():
        t = torch.tensor([0, 3999])
        out = model(x, t, y=y)
        for i in range(2):
            one = model(x[i:i + 1], t[i:i + 1], y=None if y is None else y[i:i + 1])
            torch.testing.assert_close(out[i:i + 1], one, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(model(x, t.flip(0), y=y), out, atol=1e-4)
        if y is not None:
            assert not torch.allclose(model(x, t, y=y.flip(0)), out, atol=1e-4)


def test_output_layer_is_zero_initialised():
    model = UNetConfig(image_size=16, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(8,)).build()
    assert model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2])).abs().max() == 0


def test_image_size_must_divide_by_downsampling():
    with pytest.raises(ValueError, match="not divisible"):
        UNetConfig(image_size=30, channel_mult=(1, 2, 2)).build()


def test_autocast_path_is_close_to_float32():
    torch.manual_seed(0)
    model = UNetConfig(image_size=16, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(8,)).build()
    for p in model.parameters():  # undo the zero init so the output is not trivially 0
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 300])
    ref = model(x, t)
    with autocast("cpu", True):
        low = model(x, t)
    assert low.dtype == torch.float32
    assert (low - ref).abs().max() / ref.abs().max() < 0.05
