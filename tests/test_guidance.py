"""guidance.py: multi-guidance gradients equal autograd on the summed weighted log-probs, cost, parsing."""
import pytest
import torch

from classifier import ClassifierConfig
from ddpm import DiffusionConfig
from cli import parse_lambdas
from guidance import classifier_free, multi_guidance


class Counting(torch.nn.Module):
    """Wraps a classifier and counts forward and backward passes."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.forwards, self.backwards = inner, 0, 0

    def forward(self, x, t):
        self.forwards += 1
        out = self.inner(x, t)
        if out.requires_grad:
            out.register_hook(lambda g: setattr(self, "backwards", self.backwards + 1))
        return out


def small_classifier(k, seed):
    torch.manual_seed(seed)
    model = ClassifierConfig(image_size=16, model_channels=16, num_res_blocks=1, attention_resolutions=(8,),
                             channel_mult=(1, 2, 2), num_head_channels=16, num_classes=k).build().eval()
    for p in model.parameters():       # break the zero init so gradients are not trivial
        torch.nn.init.normal_(p, std=0.05)
    return model


def test_multi_guidance_gradient_equals_autograd_oracle():
    c1, c2 = small_classifier(2, 0), small_classifier(4, 1)
    lambdas = [[30.0, 30.0], [1.0, -2.0, 0.0, 5.0]]
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 100, 3999])
    g = multi_guidance([c1, c2], lambdas)(x, t)
    oracle = torch.zeros_like(x)
    for clf, lam in zip((c1, c2), lambdas):
        for m, w in enumerate(lam):     # one autograd call per class: the slow, obvious way
            xx = x.clone().requires_grad_(True)
            lp = torch.log_softmax(clf(xx, t), -1)[:, m].sum()
            oracle += w * torch.autograd.grad(lp, xx)[0]
    torch.testing.assert_close(g, oracle, rtol=1e-4, atol=1e-6)


def test_regular_guidance_is_the_single_weight_case():
    c = small_classifier(2, 2)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 50])
    xx = x.clone().requires_grad_(True)
    oracle = torch.autograd.grad(7.0 * torch.log_softmax(c(xx, t), -1)[:, 1].sum(), xx)[0]
    torch.testing.assert_close(multi_guidance([c], [[0.0, 7.0]])(x, t), oracle)


def test_all_zero_weights_mean_unguided():
    assert multi_guidance([small_classifier(2, 0)], [[0, 0]]) is None


@pytest.mark.parametrize("k", [2, 4])
def test_one_forward_and_one_backward_per_step_whatever_the_classes(k):
    clf = Counting(small_classifier(k, 3))
    d = DiffusionConfig(diffusion_steps=1000).build().respace(10)
    model = lambda x, t: torch.zeros(x.shape[0], 6, *x.shape[2:])
    d.p_sample_loop(model, (2, 3, 16, 16), cond_fn=multi_guidance([clf], [[30.0] * k]))
    assert clf.forwards == 10 and clf.backwards == 10


def test_guidance_runs_in_float32_under_autocast():
    c = small_classifier(2, 4)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 50])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = multi_guidance([c], [[30.0, 30.0]])(x, t)
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, multi_guidance([c], [[30.0, 30.0]])(x, t))


@pytest.mark.parametrize("text,message", [("30", "2 classes"), ("abc", "comma-separated"), ("30,,30", "comma-separated"),
                                          ("nan,30", "NaN"), ("30,30,30", "2 classes")])
def test_parse_lambdas_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_lambdas(text, 2)


def test_parse_lambdas_ok():
    assert parse_lambdas("30,30", 2) == [30.0, 30.0] and parse_lambdas("-1.5,0,2e1") == [-1.5, 0.0, 20.0]


def test_classifier_free_combination():
    """ε̂ = -λ ε̂(∅) + (1+λ) mean_c ε̂(c): a model whose output is its label reproduces the formula on ε̂,
    and the v channels are the conditional mean, not extrapolated."""
    model = lambda x, t, y: y.float().view(-1, 1, 1, 1).expand(-1, 6, *x.shape[2:])
    out = classifier_free(model, 3.0, num_classes=2)(torch.zeros(4, 3, 2, 2), torch.zeros(4, dtype=torch.long))
    assert torch.allclose(out[:, :3], torch.full_like(out[:, :3], -3.0 * 2 + 4.0 * 0.5))   # labels ∅=2, c=0,1
    assert torch.allclose(out[:, 3:], torch.full_like(out[:, 3:], 0.5))


def test_classifier_free_guides_eps_only_and_keeps_the_variance_in_range():
    """λ = 3, ε̂(c) = 0.2, ε̂(∅) = 0, v(c) = 0.9, v(∅) = -0.9: ε̂ 4·0.2 = 0.8 and v = 0.9 (combining v too gives
    -3·(-0.9) + 4·0.9 = 6.3, a variance e^{2.65 (log β_t - log β̃_t)} times β_t)."""
    def model(x, t, y):
        null = (y == 2).float().view(-1, 1, 1, 1)
        eps = (1 - null) * 0.2 * torch.ones_like(x)
        v = (0.9 - 1.8 * null) * torch.ones_like(x)
        return torch.cat([eps, v], dim=1)
    x, t = torch.zeros(2, 3, 4, 4), torch.tensor([10, 30])
    guided = classifier_free(model, 3.0, num_classes=2)
    out = guided(x, t)
    torch.testing.assert_close(out[:, :3], torch.full_like(x, 0.8))
    torch.testing.assert_close(out[:, 3:], torch.full_like(x, 0.9))
    diffusion = DiffusionConfig(diffusion_steps=40).build()
    var = diffusion.p_mean_variance(guided, x, t)["variance"]
    lo = torch.tensor(diffusion.posterior_variance[[10, 30]], dtype=torch.float32).view(-1, 1, 1, 1)
    hi = torch.tensor(diffusion.betas[[10, 30]], dtype=torch.float32).view(-1, 1, 1, 1)
    assert bool((var >= lo * (1 - 1e-5)).all()) and bool((var <= hi * (1 + 1e-5)).all())


def test_classifier_free_gives_every_branch_the_timesteps_of_its_examples():
    """The K + 1 branches (classes 0..K-1, then the null label K) are one batch: x and t repeated K + 1 times."""
    seen = {}

    def model(x, t, y):
        seen.update(x=x, t=t, y=y)
        return torch.zeros(x.shape[0], 3, 1, 1)

    x, t = torch.arange(6.0).view(2, 3, 1, 1), torch.tensor([7, 900])
    classifier_free(model, 1.0, num_classes=2)(x, t)
    assert seen["t"].tolist() == [7, 900] * 3 and seen["y"].tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(seen["x"], torch.cat([x, x, x]))


def test_guidance_gradient_is_exact_float32_under_a_bfloat16_autocast():
    """Linear logits W x: ∇_x Σ_m λ_m log p_m = Wᵀ(λ − p Σ_m λ_m) (closed form, float64). bfloat16 matmuls would be
    off by ~1e-2; the classifier must run with autocast disabled even inside the sampler's autocast."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 12, generator=g)
    x, t = torch.randn(2, 3, 2, 2, generator=g), torch.tensor([4, 9])
    lam = torch.tensor([2.0, -1.0, 0.5])
    clf = lambda xx, tt: torch.nn.functional.linear(xx.flatten(1), w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = multi_guidance([clf], [lam.tolist()])(x, t)
    wd, xd, ld = w.double(), x.double().flatten(1), lam.double()
    p = torch.softmax(xd @ wd.T, dim=-1)
    want = ((ld - p * ld.sum()) @ wd).view_as(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


