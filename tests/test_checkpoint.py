"""Checkpoints: safetensors + JSON rebuild the model alone, byte for byte in behaviour."""
import json

import pytest
import torch

from purifier import checkpoint
from purifier.models.cvae import CVAE, CVAEConfig


def test_round_trip_rebuilds_the_same_model(tmp_path, small_cvae, small_classifier, batch):
    for name, module in (("cvae", small_cvae), ("clf", small_classifier)):
        stem = checkpoint.save(module, tmp_path / name, meta={"note": name})
        loaded = checkpoint.load(stem)
        assert type(loaded) is type(module) and loaded.cfg == module.cfg and not loaded.training
        assert loaded.meta == {"note": name}
        for k, v in module.state_dict().items():
            assert torch.equal(v, loaded.state_dict()[k])
    assert torch.equal(checkpoint.load(tmp_path / "clf.safetensors")(batch), small_classifier(batch))
    record = json.loads((tmp_path / "cvae.json").read_text())
    assert record["kind"] == "cvae" and record["config"]["latent_dim"] == 8
    assert not list(tmp_path.glob("*.tmp"))


def test_embedding_conditioning_round_trips(tmp_path, batch):
    cvae = CVAE(CVAEConfig(conditioning="embedding", channels=(8, 16), hidden=32)).eval()
    loaded = checkpoint.load(checkpoint.save(cvae, tmp_path / "emb"))
    assert torch.equal(loaded.reconstruct_all(batch)["recon"], cvae.reconstruct_all(batch)["recon"])


def test_tampered_weights_are_refused(tmp_path, small_cvae):
    stem = checkpoint.save(small_cvae, tmp_path / "cvae")
    record = json.loads(stem.with_suffix(".json").read_text())
    record["weights_sha256"] = "0" * 64
    stem.with_suffix(".json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="does not match"):
        checkpoint.load(stem)


def test_wrong_kind_is_named(tmp_path, small_cvae):
    stem = checkpoint.save(small_cvae, tmp_path / "cvae")
    with pytest.raises(ValueError, match="holds a 'cvae', expected a 'classifier'"):
        checkpoint.load(stem, expect="classifier")
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        checkpoint.load(tmp_path / "nothing")


def test_a_stem_with_dots_keeps_its_name(tmp_path, small_classifier, batch):
    """``pgd-at-v1.2`` is a stem, not ``pgd-at-v1`` with an extension: its files are ``pgd-at-v1.2.json`` and
    ``pgd-at-v1.2.safetensors``, and each of the three names loads the same checkpoint."""
    from purifier.classifier_io import ClassifierSource

    stem = checkpoint.save(small_classifier, tmp_path / "pgd-at-v1.2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pgd-at-v1.2.json", "pgd-at-v1.2.safetensors"]
    for name in ("pgd-at-v1.2", "pgd-at-v1.2.json", "pgd-at-v1.2.safetensors"):
        assert torch.equal(checkpoint.load(tmp_path / name, expect="classifier")(batch), small_classifier(batch))
    assert checkpoint.read_record(stem)["kind"] == "classifier"
    source = ClassifierSource("checkpoint", path=str(stem))
    assert [p.name for p in source.files()] == ["pgd-at-v1.2.safetensors", "pgd-at-v1.2.json"]
    assert source.sha256() == checkpoint.sha256_file(tmp_path / "pgd-at-v1.2.safetensors")
