"""The sampler in isolation: its draws follow the distribution, masks hold, seeds are per request."""

from __future__ import annotations

import torch

from shardline.engine.sampler import Sampler, SamplingRow, inverse_transform
from shardline.engine.sampling_params import SamplingParams


def _rows(params: list[SamplingParams]) -> list[SamplingRow]:
    return [SamplingRow(p, [1, 2, 3], []) for p in params]


def test_inverse_transform_picks_each_token_at_its_share():
    probs = torch.tensor([[0.5, 0.0, 0.25, 0.125, 0.125]])
    # The cumulative mass is 0.5 / 0.5 / 0.75 / 0.875 / 1: a uniform number falls in one token's interval.
    picks = [inverse_transform(probs, torch.tensor([u], dtype=torch.float64)).item() for u in (0.0, 0.49, 0.5, 0.74, 0.8, 0.999)]
    assert picks == [0, 0, 2, 2, 3, 4]  # the zero-probability token 1 is never chosen
    assert inverse_transform(probs * 7, torch.tensor([0.8], dtype=torch.float64)).item() == 3  # unnormalized


def test_draws_follow_the_softmax_of_the_logits_at_temperature():
    torch.manual_seed(0)
    logits = torch.randn(6) * 2
    params = SamplingParams(temperature=0.7)
    sampler = Sampler(seed=5)
    counts = torch.zeros(6)
    for _ in range(100):
        out = sampler(logits.repeat(200, 1), _rows([params] * 200))
        counts += torch.bincount(torch.tensor(out.token_ids), minlength=6)
    expected = torch.softmax(logits / 0.7, dim=-1) * counts.sum()
    # 20000 draws: every count within 4 standard deviations of its expectation
    assert ((counts - expected).abs() <= 4 * expected.sqrt() + 1).all(), (counts, expected)


def test_a_large_vocabulary_keeps_its_small_tail():
    """The last token of a 49152-token vocabulary, at 1e-9 after all the rest of the mass, keeps its interval
    (summed in fp32 it would add nothing to a running sum of 1 and could never be drawn)."""
    vocab = 49152
    probs = torch.full((1, vocab), (1 - 1e-9) / (vocab - 1))
    probs[0, -1] = 1e-9
    assert probs.cumsum(dim=-1)[0, -2] == probs.cumsum(dim=-1)[0, -1]  # fp32: the tail is lost
    u = torch.tensor([1 - 5e-10], dtype=torch.float64)
    assert inverse_transform(probs, u).item() == vocab - 1
    assert inverse_transform(probs, torch.tensor([1 - 2e-9], dtype=torch.float64)).item() == vocab - 2


def test_top_k_top_p_and_min_p_exclude_their_tokens():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0])
    cases = [
        (SamplingParams(temperature=1.0, top_k=2), {0, 1}),
        (SamplingParams(temperature=1.0, top_p=0.5), {0}),  # token 0 alone holds 64% of the mass
        (SamplingParams(temperature=1.0, min_p=0.2), {0, 1}),  # e^-1 = 0.37 of the top stays, e^-2 = 0.14 does not
    ]
    sampler = Sampler(seed=3)
    for params, allowed in cases:
        out = sampler(logits.repeat(500, 1), _rows([params] * 500))
        assert set(out.token_ids) == allowed, (params, set(out.token_ids))


def test_a_seeded_row_draws_the_same_token_in_any_batch():
    torch.manual_seed(1)
    logits = torch.randn(8, 1000)
    seeded = SamplingParams(temperature=1.0, seed=42)
    alone = Sampler(seed=1)(logits[3:4].clone(), _rows([seeded]))
    mixed = [SamplingParams(temperature=0.9)] * 3 + [seeded] + [SamplingParams(temperature=0.0)] * 4
    in_batch = Sampler(seed=2)(logits.clone(), _rows(mixed))
    assert in_batch.token_ids[3] == alone.token_ids[0]
    assert in_batch.token_ids[4] == int(logits[4].argmax())  # greedy rows beside it stay greedy
