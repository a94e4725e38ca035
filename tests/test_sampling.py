"""Sampling: the same tokens as the sampler before it dropped its device syncs, and the sampler's own laws."""

from __future__ import annotations

import pytest
import torch

from lorabatch.worker.engine.sampling import RowSampler, sample_filtered, sample_next, tokens_of

CASES = {
    "all_greedy": [dict(temperature=0)] * 4,
    "plain": [dict(temperature=1.0, seed=1), dict(temperature=0.7, seed=2)],
    "top_k": [dict(temperature=1.0, top_k=5, seed=3), dict(temperature=1.3, top_k=50, seed=4)],
    "top_p": [dict(temperature=1.0, top_p=0.9, seed=5), dict(temperature=0.5, top_p=0.5, seed=6)],
    "top_k_and_p": [dict(temperature=0.8, top_k=20, top_p=0.8, seed=7)],
    "mixed": [dict(temperature=0), dict(temperature=1.0, seed=8), dict(temperature=1.0, top_k=3, seed=9),
              dict(temperature=0), dict(temperature=0.9, top_p=0.7, seed=10),
              dict(temperature=1.1, top_k=2000, top_p=0.95, seed=11), dict(temperature=2.0, top_p=0.0, seed=12),
              dict(temperature=1.0, top_k=1, seed=13)],
    "top_k_over_vocab": [dict(temperature=1.0, top_k=10**6, seed=14), dict(temperature=1.0, seed=15)],
}

RECORDED = {
    # Recorded from the sampler of commit b6eb93c (boolean masks and int(k.max()) on the device), 4 steps of
    # logits randn(rows, 512) * 0.5 from a generator seeded 1234.
    "all_greedy": [[227, 274, 467, 200], [470, 388, 346, 277], [312, 446, 34, 151], [505, 260, 123, 190]],
    "plain": [[389, 307], [145, 200], [214, 329], [373, 266]],
    "top_k": [[227, 48], [467, 255], [435, 237], [346, 350]],
    "top_p": [[194, 195], [343, 77], [118, 42], [62, 377]],
    "top_k_and_p": [[433], [257], [449], [320]],
    "mixed": [[227, 299, 473, 200, 224, 112, 346, 277], [312, 438, 34, 151, 193, 487, 123, 190],
              [76, 484, 295, 275, 204, 138, 439, 349], [462, 137, 474, 188, 44, 472, 368, 271]],
    "top_k_over_vocab": [[498, 160], [467, 141], [379, 410], [9, 205]],
}


def samplers_for(case: list[dict]) -> list[RowSampler]:
    return [RowSampler.create(temperature=c.get("temperature", 0), top_p=c.get("top_p", 1.0),
                              top_k=c.get("top_k", 0), seed=c.get("seed")) for c in case]


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_tokens_as_the_sampler_with_device_syncs(name):
    """For the same seeds and logits, every row gets exactly the tokens the previous sampler gave."""
    samplers = samplers_for(CASES[name])
    g = torch.Generator().manual_seed(1234)
    got = [sample_next(torch.randn(len(samplers), 512, generator=g) * 0.5, samplers).tolist() for _ in range(4)]
    assert got == RECORDED[name]


def test_a_seeded_row_gives_the_same_tokens_in_any_batch():
    """A seeded row's tokens do not depend on its neighbours, their settings or its position in the batch."""
    g = torch.Generator().manual_seed(7)
    logits = [torch.randn(1, 300, generator=g) for _ in range(5)]
    me = dict(temperature=0.9, top_k=40, top_p=0.9, seed=99)
    alone = samplers_for([me])
    expected = [sample_next(x, alone).item() for x in logits]
    neighbours = samplers_for([dict(temperature=0), dict(temperature=1.2, seed=1), me, dict(temperature=1.0, top_p=0.5,
                                                                                             seed=2)])
    got = []
    for x in logits:
        batch = torch.cat([torch.randn(2, 300, generator=g), x, torch.randn(1, 300, generator=g)])
        got.append(sample_next(batch, neighbours)[2].item())
    assert got == expected


def test_greedy_rows_take_the_argmax_and_draw_nothing():
    """Temperature 0 is the argmax; a sampled neighbour does not change it."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    samplers = samplers_for([dict(temperature=0), dict(temperature=1.0, seed=1), dict(temperature=0)])
    tokens = sample_next(logits, samplers)
    assert tokens[[0, 2]].tolist() == logits.argmax(-1)[[0, 2]].tolist()


def sample(logits, *, top_k, top_p, uniforms):
    n = logits.shape[0]
    return tokens_of(sample_filtered(logits, temperature=[1.0] * n, top_k=top_k, top_p=top_p, uniforms=uniforms),
                     range(n))


def test_sample_filtered_limits():
    """top_k=1 or a tiny top_p is greedy; uniform draws map through the kept tokens' CDF, most likely first."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 4)
    tokens = sample(logits, top_k=[1, 0, 4, 4], top_p=[1.0, 1e-6, 1.0, 1.0], uniforms=[0.99, 0.99, 0.0, 0.999999])
    assert tokens[:2] == [1, 1]  # top-k 1; top-p tiny
    assert tokens[2] == 1  # u = 0: the most likely token
    assert tokens[3] == 0  # u near 1: the least likely token
    assert sample(logits[:1], top_k=[2], top_p=[1.0], uniforms=[0.999]) == [3]  # top-k 2 keeps tokens 1 and 3 only


def test_unfiltered_rows_walk_the_cdf_in_vocabulary_order():
    """Without top-k or top-p no sort is needed: a uniform picks the token whose CDF span holds it."""
    logits = torch.tensor([0.1, 0.5, 0.0, 0.4]).log()[None, :].repeat(4, 1)
    tokens = sample(logits, top_k=[0] * 4, top_p=[1.0] * 4, uniforms=[0.05, 0.3, 0.61, 1.0])
    assert tokens == [0, 1, 3, 3]  # token 2 (probability 0) is never drawn, not even at u = 1


def test_sampled_frequencies_follow_the_distribution():
    """Many uniforms through either path reproduce the softmax probabilities (top-k = vocabulary: the same law)."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5]])
    expected = logits.softmax(-1)[0]
    u = ((torch.arange(4000) + 0.5) / 4000).tolist()
    for top_k in (0, 4):
        tokens = sample(logits.repeat(4000, 1), top_k=[top_k] * 4000, top_p=[1.0] * 4000, uniforms=u)
        counts = torch.bincount(torch.tensor(tokens), minlength=4) / 4000
        torch.testing.assert_close(counts, expected, atol=2e-3, rtol=0)
