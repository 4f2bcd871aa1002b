"""classifier.py: spectral-norm bound, temperature-scaling recovery, ECE, the noisy training loss."""
import pytest
import torch
import torch.nn.functional as F

from beyond.cpu_preset import MirrorEquivariant
from classifier import (ClassifierConfig, SpectralNorm, calibrate, converge_spectral_norm,
                        expected_calibration_error, fit_temperature, noisy_classifier_loss, spectral_norm_sigmas)
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
    assert converge_spectral_norm(model) > 10   # what train.py does before saving: u, v of the final weights
    model.eval()
    sigmas = spectral_norm_sigmas(model)
    assert len(sigmas) > 10
    nonzero = {k: s for k, s in sigmas.items() if s > 0}
    assert len(nonzero) == len(sigmas)          # zero-initialised layers got normalised too
    # Converged: σ̂ = σ_max(W), so every normalised weight has largest singular value exactly the factor.
    assert max(nonzero.values()) <= lipschitz * (1 + 1e-4)
    assert min(nonzero.values()) >= lipschitz * (1 - 1e-4)


def _layers_in_use(model):
    """σ_max of each normalised weight as the last training forward used it (eval: the buffers stay put)."""
    model.eval()
    sigmas = spectral_norm_sigmas(model)
    model.train()
    return sigmas


def test_spectral_norm_bounds_the_weights_of_every_training_step():
    """The bound holds, to a few percent, on the weights each forward uses, with 2 iterations per forward.

    Power iteration only approaches σ_max from below (σ̂ = uᵀWv <= σ_max), slowly where the top two singular
    values are close (as in the time-embedding layers), so a layer can sit a few percent over the factor while
    its weights move; 10% is far below what a broken iteration does (u from the previous v: 2-10x).
    """
    torch.manual_seed(0)
    lipschitz = 0.5
    model = ClassifierConfig(**{**SMALL, "model_channels": 8, "num_head_channels": 8}, spectral_norm=True,
                             lipschitz=lipschitz).build()
    opt = torch.optim.AdamW(model.parameters(), 3e-4, weight_decay=0.0)
    x, t, y = torch.randn(4, 3, 16, 16), torch.randint(0, 4000, (4,)), torch.randint(0, 2, (4,))
    worst = []
    for step in range(25):
        loss = F.cross_entropy(model(x, t), y)
        opt.zero_grad(); loss.backward()
        worst.append(max(_layers_in_use(model).values()))
        opt.step()
    assert max(worst[2:]) <= lipschitz * 1.10, worst


@pytest.mark.parametrize("shape", [(5, 7), (6, 3, 3, 3)])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_power_iteration_and_sigma_match_torch_spectral_norm(shape, n):
    """Same weight, same u and v, n iterations: our u, v and normalised weight equal torch's (× the factor)."""
    torch.manual_seed(1)
    layer = torch.nn.Linear(shape[1], shape[0]) if len(shape) == 2 else torch.nn.Conv2d(shape[1], shape[0], 3)
    w = torch.randn(shape)
    ours = SpectralNorm(w, lipschitz=0.7, n_power_iterations=n)
    u0, v0 = F.normalize(torch.randn(shape[0]), dim=0), F.normalize(torch.randn(w[0].numel()), dim=0)
    ours._u.copy_(u0); ours._v.copy_(v0)
    oracle = torch.nn.utils.parametrizations.spectral_norm(layer, n_power_iterations=n)
    with torch.no_grad():
        oracle.parametrizations.weight.original.copy_(w)
    ref = oracle.parametrizations.weight[0]
    ref._u.copy_(u0); ref._v.copy_(v0)
    oracle.train(); ours.train()
    expected = oracle.weight.detach() * 0.7
    got = ours(w)
    torch.testing.assert_close(ours._u, ref._u)
    torch.testing.assert_close(ours._v, ref._v)
    torch.testing.assert_close(got, expected)
    assert float(ours.sigma(w)) > 0


def test_power_iteration_resumes_on_a_zero_initialised_weight():
    """A zero weight keeps u, v (torch's would zero them for good); once non-zero, σ̂ converges to σ_max."""
    torch.manual_seed(2)
    w = torch.zeros(4, 6)
    sn = SpectralNorm(w, lipschitz=1.0, n_power_iterations=2).train()
    assert float(sn._u.norm()) == pytest.approx(1.0) and float(sn._v.norm()) == pytest.approx(1.0)
    assert torch.equal(sn(w), w)
    w = torch.randn(4, 6)
    for _ in range(50):
        sn(w)
    assert float(sn.sigma(w)) == pytest.approx(float(torch.linalg.matrix_norm(w, ord=2)), rel=1e-5)


def test_spectral_norm_is_rebuilt_from_config_and_state():
    torch.manual_seed(0)
    clf_config = ClassifierConfig(**SMALL, spectral_norm=True, lipschitz=0.7)
    a = clf_config.build().eval()
    b = clf_config.build().eval()
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
    d = DiffusionConfig(diffusion_steps=100).build()
    seen = {}

    def clf(x, t):
        seen["t"] = t
        seen["x"] = x.clone()
        seen["out"] = torch.zeros(x.shape[0], 2, requires_grad=True)
        return seen["out"]

    loss, logits = noisy_classifier_loss(clf, d, torch.zeros(64, 3, 4, 4), torch.zeros(64, dtype=torch.long))
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert seen["t"].min() >= 0 and seen["t"].max() < 100 and seen["t"].dtype == torch.long
    assert logits is seen["out"]                                # the classifier's own logits come back
    # x_0 = 0, so the classifier sees x_t = sqrt(1-ᾱ_t) ε: dividing by sqrt(1-ᾱ_t) of its t leaves ε ~ N(0, 1)
    scale = torch.from_numpy(d.sqrt_one_minus_alphas_cumprod)[seen["t"]].float().view(-1, 1, 1, 1)
    eps = seen["x"] / scale
    assert abs(eps.mean().item()) < 0.1 and eps.std().item() == pytest.approx(1.0, abs=0.1)
    # t and ε come from the generator: the same seed gives the same t and x_t, another seed others
    draws = []
    for seed in (5, 5, 6):
        noisy_classifier_loss(clf, d, torch.zeros(64, 3, 4, 4), torch.zeros(64, dtype=torch.long),
                              generator=torch.Generator().manual_seed(seed))
        draws.append((seen["t"], seen["x"]))
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    assert not torch.equal(draws[0][0], draws[2][0]) and not torch.equal(draws[0][1], draws[2][1])


def test_noisy_loss_feeds_q_sample_of_the_given_t_and_noise_with_the_raw_timestep():
    """x_t = sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε [DDPM eq. 4], ᾱ_t from the cosine closed form [IDDPM eq. 17] at the
    integer index t (the paper's t + 1), and t itself (not rescaled) goes to the classifier."""
    import math
    d = DiffusionConfig(diffusion_steps=100).build()
    x0 = torch.linspace(-1, 1, 24).view(2, 3, 2, 2)
    noise = torch.linspace(0.9, -1.3, 24).view(2, 3, 2, 2)
    t = torch.tensor([3, 50])
    seen = {}

    def clf(x, tt):
        seen.update(x=x.clone(), t=tt.clone())
        return torch.tensor([[0.0, 1.0], [2.0, 0.0]])

    loss, _ = noisy_classifier_loss(clf, d, x0, torch.tensor([1, 0]), t=t, noise=noise)
    s = 0.008
    f = lambda u: math.cos((u / 100 + s) / (1 + s) * math.pi / 2) ** 2
    a = torch.tensor([f(k + 1) / f(0) for k in (3, 50)], dtype=torch.float64).view(-1, 1, 1, 1)
    expected = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
    torch.testing.assert_close(seen["x"].double(), expected, rtol=1e-5, atol=1e-6)
    assert seen["t"].tolist() == [3, 50] and seen["t"].dtype == torch.long
    # cross-entropy by hand: -log softmax([0, 1])[1] = log(1 + e^-1), -log softmax([2, 0])[0] = log(1 + e^-2)
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-2))) / 2, rel=1e-6)


def test_training_loss_of_the_classifier_feeds_the_drawn_t_and_noise_through_q_sample():
    """train.classifier_loss: the classifier sees q_sample(x_0, t, ε) for the (t, ε) drawn from the loss generator."""
    import train
    d = DiffusionConfig(diffusion_steps=100).build()
    x0 = torch.linspace(-1, 1, 4 * 3 * 2 * 2).view(4, 3, 2, 2)
    seen = {}

    def clf(x, t):
        seen.update(x=x.clone(), t=t.clone())
        return torch.zeros(x.shape[0], 2)

    train.classifier_loss(d)(clf, x0, torch.tensor([0, 1, 1, 0]), torch.Generator().manual_seed(3))
    _, t, noise = train.draw_t_noise(torch.Generator().manual_seed(3), x0, 100, slice(None))
    assert torch.equal(seen["t"], t) and seen["t"].dtype == torch.long
    a = torch.from_numpy(d.alphas_cumprod)[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x"].double(), a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double(),
                               rtol=1e-5, atol=1e-6)


def test_ece_by_hand_with_a_confidence_on_a_bin_edge():
    """Two bins (0, 0.5], (0.5, 1]. Confidences 0.5 (right), 0.45 (right) | 0.9 (wrong), 0.6 (right):
    ECE = 2/4 · |1 - 0.475| + 2/4 · |1/2 - 0.75| = 0.2625 + 0.125. A confidence of exactly 0.5 is in the lower bin."""
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.9, 0.0], [0.0, 0.4, 0.6], [0.3, 0.45, 0.25]])
    labels = torch.tensor([0, 0, 2, 1])
    assert expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(0.3875, abs=1e-6)


def test_calibrate_reports_the_nll_before_and_after_scaling():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (200,), generator=g)
    logits = 4 * (torch.randn(200, 3, generator=g) + 2 * F.one_hot(labels, 3))      # overconfident
    model = ClassifierConfig(**SMALL).build()
    report = calibrate(model, logits, labels)
    t = report["temperature"]
    assert set(report) == {"temperature", "ece_before", "ece_after", "nll_before", "nll_after"}
    assert model.temperature.item() == pytest.approx(t) and t > 1
    assert report["nll_before"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert report["nll_after"] == pytest.approx(F.cross_entropy(logits / t, labels).item(), rel=1e-6)
    assert report["nll_after"] < report["nll_before"]
    assert report["ece_before"] == expected_calibration_error(logits.softmax(1), labels, n_bins=15)   # 15 bins
    assert report["ece_after"] == expected_calibration_error((logits / t).softmax(1), labels, n_bins=15)


def test_noisy_loss_draws_every_timestep_from_zero_to_t_minus_one():
    d = DiffusionConfig(diffusion_steps=4).build()
    seen = {}

    def clf(x, t):
        seen["t"] = t
        return torch.zeros(x.shape[0], 2)

    noisy_classifier_loss(clf, d, torch.zeros(200, 1, 2, 2), torch.zeros(200, dtype=torch.long),
                          generator=torch.Generator().manual_seed(0))
    assert sorted(seen["t"].unique().tolist()) == [0, 1, 2, 3]


def test_spectral_norm_defaults_and_attention_layers_left_alone():
    from torch.nn.utils import parametrize

    from classifier import apply_spectral_norm
    sn = SpectralNorm(torch.randn(4, 3))
    assert sn.lipschitz == 0.5 and sn.n_power_iterations == 2
    torch.manual_seed(0)
    model = apply_spectral_norm(ClassifierConfig(**SMALL).build())
    norms = [p for m in model.modules() if parametrize.is_parametrized(m, "weight")
             for p in m.parametrizations.weight]
    assert len(norms) > 10 and all(p.lipschitz == 0.5 and p.n_power_iterations == 2 for p in norms)
    assert not parametrize.is_parametrized(model.pool.qkv_proj) and not parametrize.is_parametrized(model.pool.c_proj)
    attn = [m for m in model.modules() if type(m).__name__ == "AttentionBlock"]
    assert attn and not any(parametrize.is_parametrized(m) for a in attn for m in a.modules())
    assert parametrize.is_parametrized(model.time_embed[0])
    model = apply_spectral_norm(ClassifierConfig(**SMALL).build(), lipschitz=1.0, n_power_iterations=5)
    assert {(p.lipschitz, p.n_power_iterations) for m in model.modules() if parametrize.is_parametrized(m, "weight")
            for p in m.parametrizations.weight} == {(1.0, 5)}


def test_default_channel_mult_is_the_official_create_classifier_table():
    from classifier import default_channel_mult
    assert default_channel_mult(128) == (1, 1, 2, 3, 4) and default_channel_mult(64) == (1, 2, 3, 4)
    assert default_channel_mult(32) == (1, 2, 2, 2) and default_channel_mult(16) == (1, 2, 2)
    assert default_channel_mult(8) == (1, 2, 2)


def _group_norm(x, gn):
    return F.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps)


def test_eval_net_is_the_compact_resnet_it_describes():
    """EvalNet against a by-hand forward of its own weights: stem conv 3x3 + GN + SiLU; stage i a BasicBlock of
    width·2^i channels, stride 1 then 2 (1x1 strided projection when the shape changes, identity otherwise);
    global mean; dropout + linear head; / temperature. Random weights in place of the zero/one GroupNorm defaults."""
    from appendix.evaluator import EvalConfig
    torch.manual_seed(0)
    net = EvalConfig(in_channels=2, width=8, stages=3, num_classes=3).build()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        net.temperature.fill_(1.5)
    net.eval()
    assert net.head[0].p == 0.2 and EvalConfig().build().head[1].out_features == 2
    assert [type(m).__name__ for m in net.trunk] == ["Conv2d", "GroupNorm32", "SiLU", "BasicBlock", "BasicBlock",
                                                     "BasicBlock"]
    x = torch.randn(2, 2, 8, 8)
    stem_conv, stem_gn = net.trunk[0], net.trunk[1]
    assert stem_conv.bias is None and stem_conv.weight.shape == (8, 2, 3, 3)
    h = F.silu(_group_norm(F.conv2d(x, stem_conv.weight, padding=1), stem_gn))
    for block, cin, cout, stride in zip(net.trunk[3:], (8, 8, 16), (8, 16, 32), (1, 2, 2)):
        c1, g1, _, c2, g2 = block.body
        assert c1.weight.shape == (cout, cin, 3, 3) and c2.weight.shape == (cout, cout, 3, 3)
        assert c1.bias is None and c2.bias is None
        body = F.silu(_group_norm(F.conv2d(h, c1.weight, stride=stride, padding=1), g1))
        body = _group_norm(F.conv2d(body, c2.weight, padding=1), g2)
        if cin == cout and stride == 1:
            assert isinstance(block.skip, torch.nn.Identity)
            skip = h
        else:
            assert block.skip.bias is None and block.skip.weight.shape == (cout, cin, 1, 1)
            skip = F.conv2d(h, block.skip.weight, stride=stride)
        h = F.silu(body + skip)
    assert h.shape == (2, 32, 2, 2)
    features = h.mean(dim=(2, 3))
    lin = net.head[1]
    with torch.no_grad():
        torch.testing.assert_close(net.features(x), features, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(net(x), (features @ lin.weight.T + lin.bias) / 1.5, rtol=1e-4, atol=1e-5)


def test_mean_pool_head_and_encoder_features_average_over_positions():
    from classifier import MeanPool
    torch.manual_seed(0)
    pool = MeanPool(4, 3)
    h = torch.randn(2, 4, 3, 5)
    with torch.no_grad():
        torch.testing.assert_close(pool(h), h.mean(dim=(2, 3)) @ pool.proj.weight.T + pool.proj.bias)
        model = ClassifierConfig(**SMALL, pool="adaptive").build().eval()
        assert isinstance(model.pool, MeanPool)
        x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 900])
        trunk = model.trunk(x, t)
        torch.testing.assert_close(model.features(x, t), trunk.mean(dim=(2, 3)))
        torch.testing.assert_close(model(x, t), model.pool.proj(trunk.mean(dim=(2, 3))))


def _attention_pool_by_hand(pool, x):
    """CLIP attention pooling written out: tokens = [mean, positions] + embedding; per head h (channels
    h·d .. (h+1)·d of q, k, v), the mean token's softmax(q kᵀ / sqrt(d)) v; heads concatenated, then c_proj."""
    b, c = x.shape[:2]
    tokens = torch.cat([x.flatten(2).mean(-1, keepdim=True), x.flatten(2)], -1) + pool.positional_embedding
    tokens = tokens.transpose(1, 2)                                     # [b, L, c]
    qkv = tokens @ pool.qkv_proj.weight.T + pool.qkv_proj.bias
    q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
    d = c // pool.num_heads
    heads = []
    for h in range(pool.num_heads):
        s = slice(h * d, (h + 1) * d)
        w = torch.softmax(q[:, :1, s] @ k[:, :, s].transpose(1, 2) / d ** 0.5, -1)
        heads.append((w @ v[:, :, s])[:, 0])
    return torch.cat(heads, -1) @ pool.c_proj.weight.T + pool.c_proj.bias


def test_attention_pool_matches_the_by_hand_pooling_and_its_init():
    from classifier import AttentionPool2d
    torch.manual_seed(0)
    assert AttentionPool2d(2, 8, 16, 3).num_heads == 1 and AttentionPool2d(2, 8, 8, 3).num_heads == 1
    pool = AttentionPool2d(2, 8, 4, 3)
    assert pool.num_heads == 2 and pool.positional_embedding.shape == (8, 5)
    with torch.no_grad():
        pool.positional_embedding.copy_(torch.randn(8, 5))
        x = torch.randn(3, 8, 2, 2)
        torch.testing.assert_close(pool(x), _attention_pool_by_hand(pool, x), rtol=1e-4, atol=1e-5)
    big = AttentionPool2d(8, 64, 64, 2)                 # the init: N(0, 1) / sqrt(embed_dim), 64 x 65 values
    assert big.positional_embedding.std().item() == pytest.approx(1 / 8, rel=0.1)


def test_logits_are_divided_by_the_stored_temperature_and_sn_config_reaches_every_layer():
    from torch.nn.utils import parametrize
    torch.manual_seed(0)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    for mirror in (False, True):
        model = ClassifierConfig(**SMALL).build().eval()
        wrapped = MirrorEquivariant(model) if mirror else model
        with torch.no_grad():
            before = wrapped(x, t)
            model.temperature.fill_(2.0)
            torch.testing.assert_close(wrapped(x, t), before / 2)
    model = ClassifierConfig(**SMALL, spectral_norm=True, lipschitz=1.0, n_power_iterations=5).build()
    assert {(p.lipschitz, p.n_power_iterations) for m in model.modules() if parametrize.is_parametrized(m, "weight")
            for p in m.parametrizations.weight} == {(1.0, 5)}
    res = [m for m in ClassifierConfig(**SMALL).build().modules() if type(m).__name__ == "ResBlock"]
    assert res and all(r.use_scale_shift_norm and r.emb_layers[1].out_features == 2 * r.in_conv.out_channels
                       for r in res)                # scale and shift: 2 x out_channels
    assert sum(r.resample is not None for r in res) == 2    # resblock_updown: ResBlocks halve 16 -> 8 -> 4


def test_spectral_norm_passes_a_zero_weight_through_with_its_plain_gradient():
    """At W = 0 (σ̂ = 0) the parametrization is the identity, value and gradient: d<c, f(W)>/dW = c exactly.

    Dividing by a clamped σ̂ instead multiplied this gradient by lipschitz / eps (5e11), which froze every
    zero-initialised layer under AdamW (next test).
    """
    torch.manual_seed(3)
    w = torch.zeros(5, 4, 3, 3, requires_grad=True)
    sn = SpectralNorm(w.detach(), lipschitz=0.5).train()
    c = torch.randn(5, 4, 3, 3)
    out = sn(w)
    (out * c).sum().backward()
    assert torch.equal(out.detach(), torch.zeros_like(c))
    assert torch.equal(w.grad, c)
    # Non-zero: the normalised weight, σ_max = the factor, and a finite gradient.
    w2 = torch.randn(5, 4, 3, 3, requires_grad=True)
    for _ in range(30):
        sn(w2.detach())
    out2 = sn(w2)
    assert float(torch.linalg.matrix_norm(out2.detach().flatten(1), ord=2)) == pytest.approx(0.5, rel=1e-4)


def test_zero_initialised_layers_keep_training_under_spectral_norm():
    """Every parameter of an SN classifier, the zero-initialised last conv of each ResBlock included, still moves
    in the second half of a 60-step AdamW run (RMS change over steps 40-60 >= 0.5·lr; the frozen layers of the
    clamped division moved 0.09·lr there, the others ~2·lr), and AdamW's state stays finite and of the size of the gradients."""
    torch.manual_seed(0)
    model = ClassifierConfig(**SMALL, spectral_norm=True).build()
    zero = [n for n, p in model.named_parameters() if not p.detach().any()]
    assert len(zero) >= 5                                  # the ResBlocks' zero_module convs (biases are zero too)
    lr = 1e-3
    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=0.0)
    x, t, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4000, (8,)), torch.randint(0, 2, (8,))
    with torch.autocast("cpu", enabled=False):
        for step in range(60):
            if step == 40:
                snap = {n: p.detach().clone() for n, p in model.named_parameters()}
            loss = F.cross_entropy(model(x, t), y)
            opt.zero_grad(); loss.backward(); opt.step()
    for name, p in model.named_parameters():
        moved = float((p.detach() - snap[name]).pow(2).mean().sqrt()) / lr
        assert moved >= 0.5, (name, moved)
        state = opt.state[p]
        assert torch.isfinite(state["exp_avg"]).all() and torch.isfinite(state["exp_avg_sq"]).all()
        assert float(state["exp_avg_sq"].max()) < 1.0, name   # cross-entropy gradients of O(1) weights, not 1e16
