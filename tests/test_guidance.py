"""guidance.py: multi-guidance gradients equal autograd on the summed weighted log-probs, cost, parsing."""
import pytest
import torch

from classifier import ClassifierConfig
from ddpm import DiffusionConfig
from guidance import above_timestep, classifier_free, multi_guidance, parse_lambdas


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
    d = DiffusionConfig(num_steps=1000).build().respace(10)
    model = lambda x, t: torch.zeros(x.shape[0], 6, *x.shape[2:])
    d.p_sample_loop(model, (2, 3, 16, 16), cond_fn=multi_guidance([clf], [[30.0] * k]))
    assert clf.forwards == 10 and clf.backwards == 10


def test_above_timestep_keeps_the_gradient_at_and_above_t_min_only():
    c = small_classifier(2, 5)
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([0, 499, 500, 3999])
    full = multi_guidance([c], [[30.0, 30.0]])
    g = above_timestep(full, 500)(x, t)
    torch.testing.assert_close(g[2:], full(x, t)[2:])
    assert torch.equal(g[:2], torch.zeros_like(g[:2]))
    assert above_timestep(full, 0) is full and above_timestep(None, 500) is None


def test_above_timestep_skips_the_classifier_below_t_min():
    clf = Counting(small_classifier(2, 6))
    d = DiffusionConfig(num_steps=1000).build().respace(10)
    model = lambda x, t: torch.zeros(x.shape[0], 6, *x.shape[2:])
    d.p_sample_loop(model, (2, 3, 16, 16), cond_fn=above_timestep(multi_guidance([clf], [[30.0, 30.0]]), 500))
    guided = int((d.timestep_map >= 500).sum())
    assert 0 < guided < 10 and clf.forwards == guided and clf.backwards == guided


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
    """out = -λ out(∅) + (1+λ) mean_c out(c): a model whose output is its label reproduces the formula."""
    model = lambda x, t, y: y.float().view(-1, 1, 1, 1).expand(-1, 6, *x.shape[2:])
    out = classifier_free(model, 3.0, num_classes=2)(torch.zeros(4, 3, 2, 2), torch.zeros(4, dtype=torch.long))
    assert torch.allclose(out, torch.full_like(out, -3.0 * 2 + 4.0 * 0.5))
