"""Mixup and CutMix (augment/mixup.py): mixed inputs and losses by hand, seeding, Beta lambdas,
kept area, weighted hits.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from bigbatch.augment.mixup import BatchMixer, MixedTargets, mixed_correct, mixed_cross_entropy


def test_mixup_mixes_inputs_and_loss_by_hand():
    x = torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).reshape(4, 3, 2, 2)
    y = torch.tensor([0, 1, 2, 3])
    mixer = BatchMixer(mixup_alpha=0.9, seed=3)
    mixer.set_epoch(0)
    mixed, t = mixer(x, y)
    lam = t.lam
    assert 0.0 <= lam <= 1.0
    # Pairs come from a permutation of the batch: recover it from the targets.
    perm = t.y_b  # labels equal indices here
    assert sorted(perm.tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[perm])
    logits = torch.randn(4, 5)
    by_hand = 0.0
    for i in range(4):
        logp = torch.log_softmax(logits[i], 0)
        by_hand += -(lam * logp[y[i]] + (1 - lam) * logp[perm[i]]) / 4
    assert float(mixed_cross_entropy(logits, t)) == pytest.approx(float(by_hand), rel=1e-6)
    # Equals cross-entropy against the mixed one-hot (soft) target.
    soft = lam * F.one_hot(y, 5).float() + (1 - lam) * F.one_hot(perm, 5).float()
    assert float(F.cross_entropy(logits, soft)) == pytest.approx(float(by_hand), rel=1e-6)


def test_mixup_is_seeded_per_epoch_and_off_when_alpha_zero():
    x, y = torch.randn(8, 1, 4, 4), torch.arange(8)
    a, b = BatchMixer(0.7, seed=1), BatchMixer(0.7, seed=1)
    for m in (a, b):
        m.set_epoch(5)
    (xa, ta), (xb, tb) = a(x, y), b(x, y)
    assert torch.equal(xa, xb) and ta.lam == tb.lam and torch.equal(ta.y_b, tb.y_b)
    a.set_epoch(6)
    assert a(x, y)[1].lam != ta.lam
    off, t = BatchMixer(0.0)(x, y)
    assert off is x and t.lam == 1.0


def test_mixup_lambda_follows_beta():
    m = BatchMixer(0.7, seed=0)
    x, y = torch.zeros(2, 1, 1, 1), torch.arange(2)
    lams = torch.tensor([m(x, y)[1].lam for _ in range(4000)])  # the lambdas __call__ uses
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)).
    assert float(lams.mean()) == pytest.approx(0.5, abs=0.02)
    assert float(lams.var()) == pytest.approx(1 / (4 * (2 * 0.7 + 1)), rel=0.08)


def test_cutmix_label_weight_is_kept_area():
    x = torch.zeros(6, 1, 10, 10)
    x[3:] = 1.0
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    mixer = BatchMixer(cutmix_alpha=1.0, seed=0)
    mixed, t = mixer(x, y)
    for i in range(6):
        own = float((mixed[i] == x[i]).float().mean())
        if t.y_b[i] != y[i]:
            assert own == pytest.approx(t.lam)


def test_mixed_correct_weights_hits():
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    t = MixedTargets(torch.tensor([0, 0]), torch.tensor([1, 1]), 0.25)
    assert float(mixed_correct(logits, t)) == pytest.approx(0.25 * 1 + 0.75 * 1)
    assert math.isclose(float(mixed_correct(logits, MixedTargets(t.y_a, t.y_a, 1.0))), 1.0)
