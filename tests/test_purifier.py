"""The purifier's decision rule, its batched K-way reconstruction and the gradient modes."""
import pytest
import torch

from purifier.models.cvae import CVAE, CVAEConfig
from purifier.pipeline import PurifiedClassifier, Purifier, purify


class TemplateCVAE(CVAE):
    """Oracle: the decoder ignores z and draws a known template per class (class k: a band at rows 7k..7k+6)."""

    def __init__(self):
        super().__init__(CVAEConfig(num_classes=4, latent_dim=4, channels=(4, 8), hidden=16))
        t = torch.full((4, 1, 28, 28), 0.05)
        for k in range(4):
            t[k, :, 7 * k:7 * k + 7] = 0.95
        self.templates = t

    def decode_logits(self, z, y):
        return torch.logit(self.templates[y]) + 0.0 * z.sum(1).view(-1, 1, 1, 1)


@pytest.mark.parametrize("selection", ["mse", "likelihood"])
def test_oracle_picks_the_class_whose_template_fits(selection):
    cvae = TemplateCVAE().eval()
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    x = (cvae.templates[y] + 0.1 * torch.randn(8, 1, 28, 28, generator=g)).clamp(0, 1)
    out = Purifier(cvae, selection)(x)
    assert out["chosen_class"].tolist() == y.tolist()
    assert torch.allclose(out["purified"], cvae.templates[y], atol=1e-6)
    assert out["scores"].shape == (8, 4)


def test_oracle_between_two_templates_chooses_the_closer():
    cvae = TemplateCVAE().eval()
    a, b = cvae.templates[1], cvae.templates[2]
    x = torch.stack([0.7 * a + 0.3 * b, 0.3 * a + 0.7 * b])
    assert Purifier(cvae)(x)["chosen_class"].tolist() == [1, 2]


def test_batched_k_way_equals_per_class_loop(small_cvae, batch):
    out = small_cvae.reconstruct_all(batch)
    for k in range(small_cvae.cfg.num_classes):
        y = torch.full((len(batch),), k)
        mu, logvar = small_cvae.encode(batch, y)
        recon = small_cvae.decode(mu, y)
        assert torch.allclose(out["recon"][:, k], recon, atol=1e-6)
        assert torch.allclose(out["mu"][:, k], mu, atol=1e-6)
    scores = Purifier(small_cvae)(batch)["scores"]
    loop = torch.stack([(out["recon"][:, k] - batch).pow(2).flatten(1).mean(1) for k in range(10)], 1)
    assert torch.allclose(scores, loop, atol=1e-7)


def test_eval_mode_is_deterministic_and_training_mode_samples(small_cvae, batch):
    p = Purifier(small_cvae)
    a, b = p(batch), p(batch)
    assert torch.equal(a["purified"], b["purified"]) and torch.equal(a["scores"], b["scores"])
    small_cvae.train()
    assert not torch.equal(small_cvae.reconstruct_all(batch)["recon"], small_cvae.reconstruct_all(batch)["recon"])


@pytest.mark.parametrize("selection", ["mse", "likelihood", "iwae"])
def test_recon_error_is_the_deprecated_alias_of_scores(small_cvae, batch, selection):
    pur = Purifier(small_cvae, selection, samples=2).eval()
    with torch.no_grad():
        out, chunked = pur(batch), purify(pur, batch, batch_size=4)
    assert out["recon_error"] is out["scores"] and torch.equal(out["chosen_class"], out["scores"].argmin(1))
    assert torch.equal(chunked["recon_error"], chunked["scores"]) and torch.equal(chunked["scores"], out["scores"])


def test_purify_chunks_and_restores_mode(small_cvae, batch):
    p = Purifier(small_cvae).train()
    out = purify(p, batch, batch_size=4)
    assert p.training
    p.eval()
    # chunks of 4 against one batch of 6: equal up to float reordering (bit equality depends on thread count)
    assert torch.allclose(out["purified"], p(batch)["purified"], atol=1e-6)


def test_purify_on_a_fresh_wrapper_leaves_an_eval_cvae_in_eval(small_cvae, batch):
    """Purifier(cvae) starts in training mode; purify must not switch the CVAE it wraps to sampling."""
    small_cvae.eval()
    first = purify(Purifier(small_cvae), batch)["purified"]
    assert not small_cvae.training
    assert torch.equal(first, purify(Purifier(small_cvae), batch)["purified"])


def _input_grad(model, x, y):
    x = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return x.grad


@pytest.mark.parametrize("grad", ["bpda", "full", "softmin"])
def test_purified_classifier_passes_a_nonzero_input_gradient(small_classifier, small_cvae, batch, grad):
    model = PurifiedClassifier(small_classifier, Purifier(small_cvae), grad=grad)
    g = _input_grad(model, batch, torch.zeros(len(batch), dtype=torch.long))
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_grad_modes_share_the_forward_and_differ_in_the_backward(small_classifier, small_cvae, batch):
    p = Purifier(small_cvae)
    y = torch.zeros(len(batch), dtype=torch.long)
    logits = {g: PurifiedClassifier(small_classifier, p, grad=g)(batch) for g in ("bpda", "full", "softmin", "none")}
    for g in ("full", "softmin", "none"):
        assert torch.allclose(logits[g], logits["bpda"], atol=1e-5)
    # BPDA's input gradient is the classifier's gradient at the purified point (straight-through).
    purified = p(batch)["purified"].detach()
    assert torch.allclose(_input_grad(PurifiedClassifier(small_classifier, p, "bpda"), batch, y),
                          _input_grad(small_classifier, purified, y), atol=1e-6)
    full = _input_grad(PurifiedClassifier(small_classifier, p, "full"), batch, y)
    assert not torch.allclose(full, _input_grad(small_classifier, purified, y))
    # "none": the purifier is a constant, so no gradient reaches the input.
    x = batch.clone().requires_grad_(True)
    out = PurifiedClassifier(small_classifier, p, "none")(x)
    assert torch.autograd.grad(out.sum(), x, allow_unused=True)[0] is None


def test_purified_classifier_returns_logits_only(small_classifier, small_cvae, batch):
    out = PurifiedClassifier(small_classifier, Purifier(small_cvae))(batch)
    assert isinstance(out, torch.Tensor) and out.shape == (len(batch), 10)


@pytest.mark.parametrize("kwargs, match", [({"grad": "magic"}, "magic"), ({"tau": 0.0}, "tau")])
def test_purified_classifier_rejects_bad_options(small_classifier, small_cvae, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PurifiedClassifier(small_classifier, Purifier(small_cvae), **kwargs)


def test_unknown_selection_is_named(small_cvae):
    with pytest.raises(ValueError, match="'closest'"):
        Purifier(small_cvae, selection="closest")


def test_reconstructing_a_class_subset_equals_those_slices_of_all_k(small_cvae, batch):
    full = small_cvae.reconstruct_all(batch)
    classes = torch.tensor([[3, 1, 7]] * len(batch))
    classes[0] = torch.tensor([9, 0, 2])
    part = small_cvae.reconstruct_all(batch, classes=classes)
    assert part["recon"].shape == (len(batch), 3, 1, 28, 28)
    for i in range(len(batch)):
        assert torch.allclose(part["recon"][i], full["recon"][i, classes[i]], atol=1e-6)
