"""Known-pattern removal (the ``purify`` counter-measure): an attacker re-protects the release with our own code
and learns to remove that kind of perturbation, on tiny synthetic data."""
from __future__ import annotations

import pytest
import torch

from salm_fast.api import PurifySettings
from salm_fast.data import make_synthetic, storage_to_nchw
from salm_fast.victims.purify import KnownPatternRemoval, ResidualDenoiser

EPS_LEVELS = 8


def stripes_protector(seed: int):
    """A stand-in for a known method: +-8/255 stripes (horizontal for class 0, vertical for class 1, phase
    locked to the image grid) on three 7 x 7 blocks of each image (about a fifth of it), placed from ``seed``."""
    def protector(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n, _, h, w = images.shape
        rows = 1 - 2 * (torch.arange(h) % 2)
        cols = 1 - 2 * (torch.arange(w) % 2)
        pattern = torch.stack([rows[:, None].expand(h, w), cols[None, :].expand(h, w)])[labels]  # N x H x W
        corners = torch.randint(0, h - 7, (n, 3, 2), generator=torch.Generator().manual_seed(seed))
        mask = torch.zeros((n, h, w), dtype=torch.bool)
        for i in range(n):
            for y, x in corners[i].tolist():
                mask[i, y:y + 7, x:x + 7] = True
        delta = (pattern * mask * EPS_LEVELS)[:, None].to(torch.int16)
        return (images.to(torch.int16) + delta).clamp(0, 255).to(torch.uint8)

    return protector


def mean_error(images: torch.Tensor, clean: torch.Tensor, where: torch.Tensor | None = None) -> float:
    err = (images.float() - clean.float()).abs()
    return float(err[where].mean() if where is not None else err.mean())


@pytest.fixture(scope="module")
def data():
    ds = make_synthetic(n_train=96, n_val=4, n_test=4, seed=11)
    return storage_to_nchw(ds["train"].images), torch.from_numpy(ds["train"].labels[:, 0].copy()).long()


def test_the_denoiser_starts_as_the_identity():
    x = torch.rand(2, 3, 12, 12)
    assert torch.equal(ResidualDenoiser(3)(x), torch.zeros_like(x))


def test_a_known_pattern_is_mostly_removed_and_the_rest_left_alone(data):
    clean, labels = data
    release = stripes_protector(seed=1)(clean, labels)
    remover = KnownPatternRemoval(stripes_protector(seed=2), steps=150, width=16, seed=0)
    purified = remover(release, labels)
    assert purified.dtype == torch.uint8 and purified.shape == release.shape
    perturbed = release != clean
    # Measured: 7.8 -> 2.7 grey levels on the perturbed pixels, 1.31 -> 0.68 over all of them (0.28 on the others).
    assert mean_error(purified, clean, perturbed) < 0.5 * mean_error(release, clean, perturbed)
    assert mean_error(purified, clean) < 0.75 * mean_error(release, clean)
    assert remover.info["threshold_255"] == pytest.approx(EPS_LEVELS / 2, abs=1e-3)


def test_purify_removes_less_without_the_owners_secret_key(data):
    """The attacker's re-protection runs SALM under its own seed; the owner's release is another SALM run,
    whose code (texture per class, signs per block) is keyed by the owner's secret seed."""
    clean, labels = data
    settings = PurifySettings(rounds=1, options=(("mask_epochs", 1),))
    release = settings.protector(2, seed=1)(clean, labels)
    assert 0 < int((release.int() - clean.int()).abs().max()) <= EPS_LEVELS
    perturbed = release != clean
    errors = {}
    for key in (1, 2):  # 1: the owner's seed (a leaked key), 2: the attacker's own
        remover = KnownPatternRemoval(settings.protector(2, seed=key), steps=150, width=16, seed=0)
        purified = remover(release, labels)
        errors[key] = (mean_error(purified, clean), mean_error(purified, clean, perturbed))
    # Measured: all pixels 1.28 -> 1.01 (key 1) / 1.31 (key 2) grey levels; perturbed 7.06 -> 5.08 / 5.89.
    assert errors[1][0] < mean_error(release, clean)
    assert errors[1][1] < 0.8 * mean_error(release, clean, perturbed)
    assert errors[2][1] < mean_error(release, clean, perturbed)  # the kind of pattern is still known ...
    assert errors[2][1] > errors[1][1]  # ... but without the key less of it comes off


def test_bad_settings_and_a_bad_protector_are_refused(data):
    clean, labels = data
    with pytest.raises(TypeError, match="protector must be callable"):
        KnownPatternRemoval("salm")
    for bad in (dict(steps=0), dict(batch_size=1.5), dict(seed=-1), dict(lr=0.0)):
        with pytest.raises(ValueError, match="purify:"):
            KnownPatternRemoval(stripes_protector(0), **bad)
    with pytest.raises(ValueError, match="uint8 images of shape"):
        KnownPatternRemoval(lambda x, y: x[:1], steps=1)(clean, labels)
    with pytest.raises(ValueError, match="uint8"):
        KnownPatternRemoval(stripes_protector(0), steps=1)(clean.float(), labels)
