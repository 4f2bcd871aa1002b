"""The CUDA path against the CPU: the same weights and noise give the same diffusion quantities, losses, gradients
and guided steps (fp32 with TF32 off), and fp16 autocast stays within half-precision error. Skipped without a GPU;
`make gpu-check` runs it there (the end-to-end tests of train.py / sample.py then also run on CUDA)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from classifier import ClassifierConfig
from ddpm import DiffusionConfig
from infra.device import amp_model
from guidance import multi_guidance
from unet import UNetConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def no_tf32():
    """Exact fp32 on the GPU, so that CUDA and CPU agree to fp32 rounding."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def rel(a, b):
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


def tiny_models():
    torch.manual_seed(0)
    unet = UNetConfig(image_size=16, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                      attention_resolutions=(8,), num_heads=2).build()
    clf = ClassifierConfig(image_size=16, model_channels=8, num_res_blocks=1, attention_resolutions=(8,),
                           channel_mult=(1, 2), num_classes=2).build().eval()
    with torch.no_grad():   # the zero-initialised output layers would make every comparison trivially exact
        for p in [*unet.parameters(), *clf.parameters()]:
            if not p.any():
                p.normal_(0, 0.05)
    return unet, clf


def test_p_mean_variance_and_training_loss_match_the_cpu():
    unet, _ = tiny_models()
    diffusion = DiffusionConfig().build()
    x0, noise = torch.rand(4, 3, 16, 16) * 2 - 1, torch.randn(4, 3, 16, 16)
    t = torch.tensor([0, 10, 1000, 3999])
    cpu = diffusion.p_mean_variance(unet, diffusion.q_sample(x0, t, noise), t)
    loss_cpu = diffusion.training_losses(unet, x0, t, noise=noise)["loss"]
    gpu_net = copy.deepcopy(unet).to(CUDA)
    x0g, noiseg, tg = x0.to(CUDA), noise.to(CUDA), t.to(CUDA)
    gpu = diffusion.p_mean_variance(gpu_net, diffusion.q_sample(x0g, tg, noiseg), tg)
    loss_gpu = diffusion.training_losses(gpu_net, x0g, tg, noise=noiseg)["loss"]
    for key in ("mean", "log_variance", "pred_x0"):
        assert rel(gpu[key], cpu[key]) < 1e-5, key
    assert rel(loss_gpu, loss_cpu) < 1e-5


def test_multi_guidance_gradient_and_guided_step_match_the_cpu():
    unet, clf = tiny_models()
    sampler = DiffusionConfig().build().respace(8)
    x, t, noise = torch.randn(3, 3, 16, 16), torch.tensor([7, 4, 1]), torch.randn(3, 3, 16, 16)
    cond = multi_guidance([clf], [[30.0, 30.0]])
    with torch.no_grad():
        g_cpu, step_cpu = cond(x, t), sampler.p_sample(unet, x, t, cond_fn=cond, noise=noise)
    clf_g, unet_g = copy.deepcopy(clf).to(CUDA), copy.deepcopy(unet).to(CUDA)
    cond_g = multi_guidance([clf_g], [[30.0, 30.0]])
    with torch.no_grad():
        g_gpu = cond_g(x.to(CUDA), t.to(CUDA))
        step_gpu = sampler.p_sample(unet_g, x.to(CUDA), t.to(CUDA), cond_fn=cond_g, noise=noise.to(CUDA))
    assert rel(g_gpu, g_cpu) < 1e-4
    assert rel(step_gpu["sample"], step_cpu["sample"]) < 1e-5


def test_fp16_autocast_output_is_within_half_precision_of_fp32_and_trains():
    unet, _ = tiny_models()
    unet = unet.to(CUDA)
    x, t = torch.randn(8, 3, 16, 16, device=CUDA), torch.randint(0, 4000, (8,), device=CUDA)
    with torch.no_grad():
        ref = unet(x, t)
        half = amp_model(unet, CUDA, amp=True, channels_last=True)(x, t)
    assert half.dtype == torch.float32 and 1e-5 < rel(half, ref) < 2e-2    # rounded, but not by much
    diffusion, opt = DiffusionConfig().build(), torch.optim.AdamW(unet.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    before = [p.detach().clone() for p in unet.parameters()]
    with torch.autocast("cuda", dtype=torch.float16):
        loss = diffusion.training_losses(unet, x.clamp(-1, 1), t)["loss"].mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.isfinite(loss) and any(not torch.equal(b, p) for b, p in zip(before, unet.parameters()))


def test_fused_attention_in_fp16_matches_the_float64_softmax():
    q, k, v = (torch.randn(2, 4, 64, 32, device=CUDA, dtype=torch.float16) for _ in range(3))
    got = F.scaled_dot_product_attention(q, k, v)
    qd, kd, vd = (a.double().cpu() for a in (q, k, v))
    ref = torch.softmax(qd @ kd.transpose(-1, -2) / 32 ** 0.5, dim=-1) @ vd
    assert rel(got, ref) < 5e-3
