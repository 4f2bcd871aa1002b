"""[ZSI] App. J's variants of the chain and the loss (--noise-schedule linear, --variance large/small, --loss vlb)
and the paper preset's global batch (the official 64 per GPU on 2 GPUs)."""
import json

import numpy as np
import pytest
import torch

from infra import checkpoint as ckpt_io
import config
import train
from ddpm import DiffusionConfig, GaussianDiffusion, cosine_betas, linear_betas
from test_cli import TINY, run
from test_ddpm_small import ref_vb_bits, vb_bits_of


# ----- the linear schedule -----

@pytest.mark.parametrize("T", [1000, 4000, 21])
def test_linear_betas_are_the_closed_form(T):
    """[DDPM sec. 4]: β rises linearly from 1e-4 to 0.02 over 1000 steps; for any T improved-diffusion scales both
    ends by 1000/T: β_i = (1000/T)(1e-4 + i (0.02 - 1e-4)/(T - 1)), i = 0..T-1."""
    i = np.arange(T)
    want = 1000 / T * (1e-4 + i * (0.02 - 1e-4) / (T - 1))
    np.testing.assert_allclose(linear_betas(T), want, rtol=1e-12)
    assert linear_betas(T)[0] == pytest.approx(0.1 / T, rel=1e-12) and linear_betas(T)[-1] == pytest.approx(20 / T)
    if T == 1000:
        np.testing.assert_allclose(linear_betas(T)[[0, 500, 999]], [1e-4, 1e-4 + 500 * 0.0199 / 999, 0.02], rtol=1e-12)


def test_linear_betas_refuse_a_chain_whose_last_beta_reaches_one():
    with pytest.raises(ValueError, match="T > 20"):
        linear_betas(20)


def test_config_builds_the_named_schedule_and_loss_and_respacing_keeps_the_loss():
    d = DiffusionConfig(diffusion_steps=100, schedule="linear", loss_type="vlb").build()
    np.testing.assert_array_equal(d.betas, linear_betas(100))
    assert d.loss_type == "vlb" and d.respace(10).loss_type == "vlb"
    for bad in (dict(schedule="sigmoid"), dict(loss_type="kl")):
        with pytest.raises(ValueError, match="unknown"):
            DiffusionConfig(diffusion_steps=100, **bad).build()


def test_runs_saved_before_the_schedule_and_loss_were_recorded_load_as_cosine_hybrid(tmp_path):
    old = {"diffusion": {"diffusion_steps": 40, "learn_sigma": True, "sigma_small": False, "vb_scale": 1.0}}
    (tmp_path / "config.json").write_text(json.dumps(old))
    saved = ckpt_io.read_config(tmp_path / "config.json")
    assert saved["diffusion"]["loss_type"] == "hybrid"
    d = DiffusionConfig(**saved["diffusion"]).build()
    np.testing.assert_array_equal(d.betas, cosine_betas(40))
    assert d.loss_type == "hybrid"


# ----- L_vlb alone -----

def tiny_case(channels_out):
    g = torch.Generator().manual_seed(7)
    x0 = torch.randint(0, 256, (3, 2, 2, 2), generator=g).float() / 127.5 - 1
    x0[0, 0, 0, 0], x0[0, 1, 1, 1] = -1.0, 1.0                    # both edge bins of the decoder at t = 0
    noise = torch.randn(3, 2, 2, 2, generator=g)
    out = (torch.randn(3, channels_out, 2, 2, generator=g) * 0.2).requires_grad_(True)
    return x0, noise, out, torch.tensor([0, 1, 2])


@pytest.mark.parametrize("learn_sigma,sigma_small", [(True, False), (False, False), (False, True)])
def test_vlb_loss_is_T_times_L_t_with_no_mse_and_trains_the_mean(learn_sigma, sigma_small):
    """loss = T·L_t (improved-diffusion's RESCALED_KL, the official use_kl), L_t in bits/dim from an independent
    float64 computation; no stop-gradient: ε̂ gets a gradient from L_t alone."""
    d = GaussianDiffusion(np.linspace(0.05, 0.4, 3), learn_sigma=learn_sigma, sigma_small=sigma_small, vb_scale=2.5,
                          loss_type="vlb")
    x0, noise, out, t = tiny_case(4 if learn_sigma else 2)
    losses = d.training_losses(lambda x, tt: out, x0, t, noise=noise)
    a = np.cumprod(1 - np.linspace(0.05, 0.4, 3))[t.numpy()][:, None, None, None]
    xt = torch.from_numpy(np.sqrt(a) * x0.double().numpy() + np.sqrt(1 - a) * noise.double().numpy())
    want = (ref_vb_bits if learn_sigma else fixed_vb_bits)(d, x0, xt, out.detach(), t)
    np.testing.assert_allclose(losses["vb"].detach().double().numpy(), want, rtol=1e-4)
    assert torch.equal(losses["loss"], 3 * losses["vb"])          # T = 3; vb_scale plays no part, no mse term
    torch.testing.assert_close(losses["mse"], ((noise - out.detach()[:, :2]) ** 2).mean(dim=(1, 2, 3)))
    assert not losses["mse"].requires_grad
    losses["loss"].sum().backward()
    assert out.grad[:, :2].abs().sum() > 0                        # the mean is trained by L_vlb


def fixed_vb_bits(d, x0, xt, eps, t):
    """Float64 L_t in bits/dim with the fixed variance of `d` (β_t with β_0 -> β̃_1, or β̃_t clipped), no clipping
    of x̂_0: KL to the posterior for t > 0, the discretized decoder NLL at t = 0 (improved-diffusion's tanh Φ)."""
    g = lambda arr: arr[t.numpy()][:, None, None, None]
    xtn, epsn = xt.double().numpy(), eps.double().numpy()
    a = g(d.alphas_cumprod)
    pred_x0 = xtn / np.sqrt(a) - np.sqrt(1 / a - 1) * epsn
    mean = g(d.posterior_mean_coef1) * pred_x0 + g(d.posterior_mean_coef2) * xtn
    large = np.append(d.posterior_variance[1], d.betas[1:])
    log_var = np.broadcast_to(g(d.posterior_log_variance_clipped if d.sigma_small else np.log(large)), mean.shape)
    return vb_bits_of(d, x0, xt, mean, log_var, t)


# ----- flags, saved config, sampling -----

def test_linear_schedule_vlb_loss_fixed_variance_run_records_them_and_samples(tmp_path):
    """One tiny circles run with the three App. J settings together: config.json records them, the loss log shows
    loss = T·vb, and sample.py rebuilds the same chain from the run folder alone."""
    out = tmp_path / "appj"
    run("train.py", *TINY, "--out", out, "--steps", "2", "--what", "ddpm", "--eval-samples", "0",
        "--noise-schedule", "linear", "--loss", "vlb", "--variance", "large")
    diffusion = json.loads((out / "config.json").read_text())["diffusion"]
    assert (diffusion["schedule"], diffusion["loss_type"], diffusion["learn_sigma"]) == ("linear", "vlb", False)
    log = np.loadtxt(out / "ddpm_loss.csv", delimiter=",", ndmin=2)    # step, loss, mse, vb, steps/s
    np.testing.assert_allclose(log[:, 1], 4000 * log[:, 3], rtol=1e-4)
    _, chain, _ = ckpt_io.load_ddpm(out / "ddpm.pt")
    np.testing.assert_array_equal(chain.betas, linear_betas(4000))
    assert chain.loss_type == "vlb" and not chain.learn_sigma
    run("sample.py", "--run", out, "--num-samples", "2", "--sample-steps", "3", "--name", "s")
    with np.load(out / "samples" / "s" / "samples.npz") as f:
        assert [f[k].shape for k in f.files if f[k].ndim == 4] == [(2, 16, 16, 3)]


@pytest.mark.parametrize("flags,message", [
    (["--loss", "vlb", "--vb-scale", "4"], "drop --vb-scale"),
    (["--noise-schedule", "linear", "--diffusion-steps", "20", "--sample-steps", "4"], "--diffusion-steps > 20"),
    (["--loss", "kl"], "invalid choice"),
])
def test_bad_combinations_are_one_line_before_any_work(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train.signal, "signal", lambda *a: None)
    monkeypatch.setattr(train, "training_sets", lambda *a: pytest.fail("read the data before checking the flags"))
    with pytest.raises(SystemExit) as exit_:
        train.main([*TINY, "--steps", "1", "--out", str(tmp_path / "new"), *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and not (tmp_path / "new").exists(), err


# ----- the global batch -----

@pytest.mark.parametrize("data_set", [["--data", "circles"], ["--data", "celeba", "--data-dir", "C"]])
def test_paper_preset_global_batch_is_the_official_128_split_64_per_rank_on_two(data_set, tmp_path):
    args = config.parse_args([*data_set, "--preset", "paper"])
    run_config = config.build_config(args)
    assert run_config["train"]["batch_size"] == 128 and run_config["classifier_train"]["batch_size"] == 64
    parts = [train.rank_part(128, rank, 2) for rank in range(2)]
    assert [(p.start, p.stop) for p in parts] == [(0, 64), (64, 128)]
    assert train.rank_part(128, 0, 1) == slice(0, 128)                # one GPU: the whole 128 in one process
    config.check_run(args, run_config, torch.device("cpu"), 2, ("ddpm", "classifier"), tmp_path, "classifier")
    with pytest.raises(config.InputError, match="not divisible by the 3 processes"):
        config.check_run(args, run_config, torch.device("cpu"), 3, ("ddpm",), tmp_path, "classifier")


def test_a_classifier_guides_any_run_on_its_chain_and_image_size():
    """p(y | x_t, t) depends on q(x_t | x_0) (schedule, T) and the image size, not on the DDPM's loss or variance."""
    from cli import InputError
    run = dict(data=dict(name="circles", image_size=32), diffusion=dict(schedule="cosine", diffusion_steps=4000,
                                                                         loss_type="vlb", learn_sigma=False))
    clf = dict(data=dict(name="folder", image_size=32), diffusion=dict(diffusion_steps=4000, loss_type="hybrid",
                                                                        learn_sigma=True, vb_scale=2.0))
    ckpt_io.check_classifier_fits(clf, run, "c.pt", "runs/x")          # an old config without "schedule": cosine
    for change, message in ((dict(diffusion_steps=1000), "cosine/1000 chain"), (dict(schedule="linear"), "linear")):
        other = dict(clf, diffusion=dict(clf["diffusion"], **change))
        with pytest.raises(InputError, match=message):
            ckpt_io.check_classifier_fits(other, run, "c.pt", "runs/x")
    with pytest.raises(InputError, match="takes 16px images"):
        ckpt_io.check_classifier_fits(dict(clf, data=dict(name="folder", image_size=16)), run, "c.pt", "runs/x")
