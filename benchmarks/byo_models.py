"""A classifier the project did not make, for the bring-your-own-classifier benchmark (``benchmarks/byo.py``):
a small ResNet defined only here, trained the way a user trains theirs, then saved the two ways a user brings
one: ``weights.safetensors`` for ``--classifier-factory benchmarks/byo_models.py:small_resnet`` and ``model.onnx``
for ``--classifier-onnx``.

    python -m benchmarks.byo_models --out models/byo/resnet                       # standard training
    python -m benchmarks.byo_models --out models/byo/resnet-pgd-at --adversarial pgd --epochs 15 --patience 4
                                                                                           # PGD-AT, converged

PGD-AT keeps the weights of the epoch with the best validation robust accuracy (PGD-20 on 1,000 held-out images,
as the converged baselines of ``make converged-baselines``) and stops after ``--patience`` epochs without a better
one. Training saves its full state every ``--save-every`` steps to OUT/.training-state.safetensors; the same
command with ``--resume`` continues it and ends with the weights an uninterrupted run would have.

Writes OUT/classifier.safetensors (the state dict), OUT/classifier.json (the factory record every command reads:
``--classifier OUT/classifier``), OUT/model.onnx (the same network, exported) and OUT/train.json (its training).

The network: a 3 x 3 stem at stride 2 (16 channels, 14 x 14), three residual stages of two basic blocks each
(16, 32, 64 channels at 14, 7 and 4 pixels), global average pooling, a linear head; BatchNorm throughout (He et
al. 2016's CIFAR ResNet layout at two thirds of ResNet-20's depth; 5.5 M multiply-accumulates per image, 175 k
parameters). It takes B x 1 x 28 x 28 in [0, 1] and returns B x 10 logits. Trained like the project's classifier
A: Adam, cosine schedule, no augmentation.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.short(x))


class SmallResNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths=(16, 32, 64), blocks: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and b == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


def small_resnet() -> SmallResNet:
    """The factory ``--classifier-factory benchmarks/byo_models.py:small_resnet`` names."""
    return SmallResNet()


def main(argv=None):
    import click

    from purifier.cli.common import PRECISION_HELP, resume_options
    from purifier.config import PRECISIONS

    @click.command()
    @click.option("--out", required=True, type=click.Path(file_okay=False),
                  help="Writes classifier.safetensors + classifier.json, model.onnx and train.json here.")
    @click.option("--epochs", default=8, show_default=True)
    @click.option("--lr", default=2e-3, show_default=True)
    @click.option("--seed", default=0, show_default=True)
    @click.option("--adversarial", type=click.Choice(["none", "pgd"]), default="none", show_default=True,
                  help="pgd: Madry PGD adversarial training at --adv-eps with --adv-steps steps.")
    @click.option("--adv-eps", default=0.1, show_default=True)
    @click.option("--adv-steps", default=10, show_default=True)
    @click.option("--patience", type=click.IntRange(min=1),
                  help="pgd: stop after this many epochs without a better validation robust accuracy.")
    @click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True, help=PRECISION_HELP)
    @click.option("--threads", type=int, help="torch threads (default: torch's).")
    @resume_options
    def cmd(out, epochs, lr, seed, adversarial, adv_eps, adv_steps, patience, precision, threads, resume, save_every):
        from safetensors.torch import save_file

        from purifier.checkpoint import write_json
        from purifier.classifier_io import ClassifierSource, write_into
        from purifier.data import load_dataset
        from purifier.fitting import provenance, split
        from purifier.resume import Snapshots, data_digest
        from purifier.train import AdversarialTraining, TrainConfig, kept_epoch, seed_everything, train_classifier
        from serve.files import atomic_write

        if threads:
            torch.set_num_threads(threads)
        ds = load_dataset("fashion-mnist", "train")
        x, y, xv, yv = split(ds, "auto", seed)
        cfg = TrainConfig(epochs=epochs, lr=lr, seed=seed, precision=precision)
        adv = AdversarialTraining("pgd", adv_eps, adv_steps, patience=patience) if adversarial == "pgd" else None
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        state = out / ".training-state.safetensors"
        if state.exists() and not resume:
            raise click.UsageError(f"{state} holds the saved state of an unfinished run: pass --resume to continue "
                                   "it, or delete it to start afresh")
        seed_everything(seed)
        model = small_resnet()
        snaps = Snapshots(state, save_every, resume, {"model": "small_resnet", "train": cfg.to_dict(),
                                                      "adversarial": adv.to_dict() if adv else None,
                                                      "data": data_digest(x, y, xv, yv)})
        history = train_classifier(model, x, y, xv, yv, cfg, None, adv, snaps)
        seconds = snaps.seconds
        final = kept_epoch(history)
        weights = {k: v.contiguous() for k, v in model.state_dict().items()}
        atomic_write(out / "classifier.safetensors", lambda tmp: save_file(weights, tmp))
        onnx_path = out / "model.onnx"
        torch.onnx.export(model.eval(), (torch.rand(2, 1, 28, 28),), str(onnx_path), dynamo=True,
                          input_names=["image"], output_names=["logits"], external_data=False,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1 << 16)}})
        record = {"model": "benchmarks/byo_models.py:small_resnet", "train": cfg.to_dict(),
                  "adversarial": adv.to_dict() if adv else None, "n_train": len(x), "n_val": len(xv),
                  "history": history, "train_seconds": seconds, "resumed_at_step": snaps.resumed_at,
                  **final,
                  **provenance(" ".join(["python", "-m", "benchmarks.byo_models", *sys.argv[1:]]))}
        write_json(out / "train.json", record)
        write_into(out, ClassifierSource("factory", factory=f"{Path(__file__).resolve()}:small_resnet",
                                         weights=str(out / "classifier.safetensors")), meta=record)
        state.unlink(missing_ok=True)
        click.echo(json.dumps({"val_acc": final["val_acc"], "seconds": round(seconds)}))

    cmd(argv)


if __name__ == "__main__":
    main()
