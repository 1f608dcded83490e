"""Real training on real data: the loss's terms do what they claim, and short runs learn."""
import pytest
import torch

from purifier.data import train_val_split
from purifier.evaluate import evaluate
from purifier.losses import PuVAELoss
from purifier.models.classifiers import Classifier, ClassifierConfig
from purifier.models.cvae import CVAE, CVAEConfig
from purifier.train import TrainConfig, train_classifier, train_cvae


def test_ce_term_trains_the_decoder_and_never_the_source(small_cvae, small_classifier, batch):
    for p in small_classifier.parameters():
        p.requires_grad_(False)
    small_cvae.train()
    terms = PuVAELoss(ce_weight=1.0)(small_cvae, small_classifier, batch, torch.arange(6) % 10)
    terms["ce"].backward()
    dec = [p.grad for p in small_cvae.dec_trunk.parameters()] + [p.grad for p in small_cvae.dec_head.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in dec)
    assert all(p.grad is None for p in small_classifier.parameters())


def test_selection_term_rewards_the_true_class(small_cvae, batch):
    small_cvae.train()
    y = torch.arange(6) % 10
    terms = PuVAELoss(ce_weight=0.0, sel_weight=1.0)(small_cvae, None, batch, y)
    assert {"recon", "kl", "sel", "sel_acc", "loss"} <= set(terms) and "ce" not in terms
    terms["sel"].backward()
    assert small_cvae.enc_head[0].weight.grad.abs().sum() > 0


def test_ce_weight_without_source_is_refused(small_cvae, batch):
    with pytest.raises(ValueError, match="source"):
        PuVAELoss(ce_weight=1.0)(small_cvae, None, batch, torch.zeros(6, dtype=torch.long))


@pytest.mark.slow
def test_short_real_training_beats_chance_by_far():
    """4,000 Fashion-MNIST training images, a few epochs: far above the 10% of chance.

    (One CVAE epoch is not enough: its reconstructions are still blobs that the classifier gives one class.)
    """
    from purifier.data import load_dataset

    ds = load_dataset("fashion-mnist", "train")
    tr, va = train_val_split(len(ds.y), 1000, seed=0)
    x, y = torch.from_numpy(ds.x[tr[:4000]]), torch.from_numpy(ds.y[tr[:4000]])
    xv, yv = torch.from_numpy(ds.x[va]), torch.from_numpy(ds.y[va])
    torch.manual_seed(0)
    clf = Classifier(ClassifierConfig("a"))
    hist = train_classifier(clf, x, y, xv, yv, TrainConfig(epochs=2, seed=0))
    assert hist[-1]["val_acc"] > 0.7
    cvae = CVAE(CVAEConfig(channels=(16, 32), hidden=128))
    hist = train_cvae(cvae, clf, x, y, xv, yv, TrainConfig(epochs=3, seed=0), PuVAELoss())
    assert hist[-1]["val_argmin_acc"] > 0.6
    assert hist[-1]["recon"] < hist[0]["recon"]
    report = evaluate(clf, cvae, xv, yv)
    assert report["selections"]["mse"]["accuracy"] > 0.3
    assert report["selections"]["mse"]["argmin_acc"] == pytest.approx(hist[-1]["val_argmin_acc"])


def test_hard_negative_selection_uses_the_sources_likeliest_wrong_classes(small_cvae, small_classifier, batch):
    small_cvae.train()
    y = torch.arange(6) % 10
    calls = []
    small_cvae.reconstruct_all = (lambda orig: lambda *a, **k: calls.append(k["classes"]) or orig(*a, **k))(
        small_cvae.reconstruct_all)
    terms = PuVAELoss(ce_weight=1.0, sel_weight=1.0, sel_negatives=3)(small_cvae, small_classifier, batch, y)
    classes = calls[0]
    assert classes.shape == (6, 4) and torch.equal(classes[:, 0], y)
    with torch.no_grad():
        wrong = small_classifier(batch).scatter(1, y[:, None], float("-inf"))
    assert torch.equal(classes[:, 1:], wrong.topk(3, dim=1).indices)
    assert torch.isfinite(terms["sel"]) and terms["sel"] > 0
    with pytest.raises(ValueError, match="source"):
        PuVAELoss(ce_weight=0.0, sel_weight=1.0, sel_negatives=3)(small_cvae, None, batch, y)


def test_bf16_runs_the_training_steps_under_autocast_and_validation_in_fp32(batch):
    """precision="bf16": the steps' forward passes compute in bfloat16; the per-epoch validation stays float32."""
    torch.manual_seed(0)
    clf = Classifier(ClassifierConfig("a"))
    dtypes = []
    clf.register_forward_hook(lambda module, inputs, out: dtypes.append((module.training, out.dtype)))
    x, y = torch.rand(256, 1, 28, 28), torch.randint(0, 10, (256,))
    hist = train_classifier(clf, x, y, x[:64], y[:64], TrainConfig(epochs=1, precision="bf16"))
    assert {d for training, d in dtypes if training} == {torch.bfloat16}
    assert {d for training, d in dtypes if not training} == {torch.float32}
    assert hist[0]["loss"] == hist[0]["loss"] and TrainConfig(precision="bf16").to_dict()["precision"] == "bf16"


def test_an_unknown_precision_is_refused_by_name():
    with pytest.raises(ValueError, match="'fp16'"):
        TrainConfig(precision="fp16")
