"""scripts/bench.py: the timing helper interleaves what it compares, and a tiny table can be produced (no timings asserted)."""
import math

import pytest
import torch

from scripts.bench import bench_config, timed
from classifier import ClassifierConfig
from unet import UNetConfig


def test_timed_warms_up_then_interleaves_the_functions_round_robin():
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    secs = timed(fns, repeats=4, device=torch.device("cpu"), warmup_s=0.0)
    assert calls[:9] == ["a"] * 3 + ["b"] * 3 + ["c"] * 3          # warm-up: each function on its own
    assert calls[9:] == ["a", "b", "c"] * 4                           # timing: round-robin, one call per turn
    assert set(secs) == {"a", "b", "c"} and all(s >= 0 for s in secs.values())


def test_bench_config_gives_one_finite_row_per_mode():
    unet = UNetConfig(image_size=16, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                      attention_resolutions=(8,), num_heads=2)
    clf = ClassifierConfig(image_size=16, model_channels=8, num_res_blocks=1, attention_resolutions=(8,),
                           channel_mult=(1, 2), num_classes=2)
    rows = bench_config("tiny", unet, clf.build, batch=2, modes=["fp32", "channels_last"], repeats=1,
                        device=torch.device("cpu"), warmup_s=0.0)
    assert [r["mode"] for r in rows] == ["fp32", "channels_last"]
    for r in rows:
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("train_ms", "guided_ms", "unguided_ms", "gflops"))
    # the derived columns from their definitions: parameters of the U-Net, images/s = batch / step time, GFLOP/s =
    # the training step's FLOPs (counted here by torch's FlopCounterMode on a fresh model: the same work in every
    # mode) / step time
    from ddpm import DiffusionConfig
    from torch.utils.flop_counter import FlopCounterMode
    from unet import count_parameters
    torch.manual_seed(0)
    model = unet.build()
    x, t = torch.randn(2, 3, 16, 16), torch.randint(0, 4000, (2,))
    with FlopCounterMode(display=False) as counter:
        DiffusionConfig().build().training_losses(model, x, t)["loss"].mean().backward()
    flops = counter.get_total_flops()
    for r in rows:
        assert r["config"] == "tiny" and r["batch"] == 2
        assert r["params"] == f"{count_parameters(model) / 1e6:.2f}M"
        assert r["train_img_s"] == pytest.approx(2 / (r["train_ms"] / 1e3), rel=1e-9)
        assert r["gflops"] == pytest.approx(flops / (r["train_ms"] / 1e3) / 1e9, rel=1e-9)


def test_modes_are_parts_joined_by_plus_and_bad_ones_are_refused():
    from scripts.bench import mode_parts
    from cli import InputError
    assert mode_parts("amp+channels_last+compile") == {"amp", "channels_last", "compile"}
    assert mode_parts("fp32") == {"fp32"}
    for bad in ("fp16", "amp+bf16", "amp+"):
        with pytest.raises(InputError, match="--modes"):
            mode_parts(bad)


def test_profile_splits_the_busy_time_by_kind_of_work():
    from scripts.bench import category, profile
    assert [category(n) for n in ("aten::cudnn_convolution", "aten::convolution_backward", "aten::addmm",
                                  "aten::_scaled_dot_product_flash_attention", "aten::native_group_norm",
                                  "aten::_foreach_lerp_", "aten::copy_", "aten::mul")] == \
        ["convolution", "convolution", "matmul", "attention", "normalisation", "optimizer + EMA",
         "copies and casts", "elementwise and other"]
    unet = UNetConfig(image_size=16, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                      attention_resolutions=(8,), num_heads=2)
    clf = ClassifierConfig(image_size=16, model_channels=8, num_res_blocks=1, attention_resolutions=(8,),
                           channel_mult=(1, 2), num_classes=2)
    out = profile(unet, clf.build, batch=1, device=torch.device("cpu"), repeats=1)
    assert set(out) == {"training step", "guided sampling step"}
    for p in out.values():
        assert p["busy_ms"] == pytest.approx(sum(p["split_ms"].values()))
        assert 0 < p["busy_ms"] and p["split_ms"]["convolution"] > 0
        assert list(p["split_ms"].values()) == sorted(p["split_ms"].values(), reverse=True)


@pytest.mark.parametrize("flags,message", [
    (["--repeats", "0"], "--repeats must be a positive integer"), (["--cpu-batch", "0"], "--cpu-batch"),
    (["--skip-paper", "--skip-cpu-preset"], "leave nothing to measure"),
    (["--json", "/nonexistent/dir/b.json"], "its folder does not exist"), (["--modes", "fp16"], "--modes")])
def test_bad_flags_are_one_line_before_any_timing(flags, message, capsys):
    from scripts.bench import main
    with pytest.raises(SystemExit) as exit_:
        main(flags)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1
