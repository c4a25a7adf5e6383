"""Decimation rule: count formula, index properties, corners, batching and config checks."""
import math

import pytest
import torch

from modules.decimation import DecimationConfig, kept_from_scores, kept_indices, num_kept, token_scores, top_k_candidates


@pytest.mark.parametrize("l_dec,s,beta,L_base,min_len,expected", [
    (2025, 0, 0.5, 2000, 20, 2000),      # passkey training: 25 tokens dropped at layer 12
    (2025, 1, 0.5, 2000, 20, 1000),
    (5000, 3, 0.83, 8000, 20, 4574),     # eval 4, layer 15 (reference §1.4)
    (5000, 8, 0.83, 8000, 20, 1801),     # eval 4, layer 20
    (500, 0, 0.5, 10, 20, 20),           # min_seq_len floor
    (15, 0, 0.5, 10, 20, 15),            # never more than exist (original crashed: B11)
    (100, 0, 0.5, math.inf, 20, 100),    # L_base = inf keeps all
    (0, 0, 0.5, 2000, 20, 0),
])
def test_num_kept_formula(l_dec, s, beta, L_base, min_len, expected):
    assert num_kept(l_dec, s, beta, L_base, min_len) == expected


def _delta(b, l, d=8, seed=0):
    return torch.nn.functional.softplus(torch.randn(b, d, l, generator=torch.Generator().manual_seed(seed)))


def test_kept_indices_properties():
    cfg = DecimationConfig(activate=True, L_base=40, beta=0.5, decimating_layers=[3, 5], min_seq_len=5)
    delta = _delta(1, 200)
    for layer, s in ((3, 0), (5, 1)):
        keep = kept_indices(delta, 7, layer, cfg)[0]
        k = int(40 * 0.5**s)
        assert keep.shape == (k + 7,)
        assert torch.equal(keep, keep.sort().values) and keep.unique().numel() == keep.numel()
        assert keep.min() >= 0 and keep.max() == 199
        assert torch.equal(keep[-7:], torch.arange(193, 200))           # response tail always kept
        scores = delta[0, :, :193].norm(dim=0)
        assert torch.equal(keep[:-7], scores.topk(k).indices.sort().values)   # the largest ‖Δ‖ win


def test_identity_cases_return_none_or_everything():
    delta = _delta(1, 50)
    off = DecimationConfig(activate=False, decimating_layers=[1])
    assert kept_indices(delta, 1, 1, off) is None
    on = DecimationConfig(activate=True, decimating_layers=[1], L_base=10)
    assert kept_indices(delta, 1, 2, on) is None                           # unlisted layer
    inf = DecimationConfig(activate=True, decimating_layers=[1], L_base=math.inf)
    assert torch.equal(kept_indices(delta, 1, 1, inf)[0], torch.arange(50))
    assert torch.equal(kept_indices(delta, 50, 1, on)[0], torch.arange(50))  # all response: L_dec = 0


def test_single_token_kept():
    cfg = DecimationConfig(activate=True, decimating_layers=[0], L_base=1, min_seq_len=0)
    keep = kept_indices(_delta(1, 30), 0, 0, cfg)
    assert keep.shape == (1, 1)                                            # original: 0-d crash (B11)


def test_batch_rows_equal_one_by_one():
    cfg = DecimationConfig(activate=True, decimating_layers=[0], L_base=12, min_seq_len=3)
    delta = _delta(3, 40)
    batched = kept_indices(delta, 2, 0, cfg)
    for i in range(3):
        assert torch.equal(batched[i], kept_indices(delta[i:i + 1], 2, 0, cfg)[0])


@pytest.mark.parametrize("kw,needle", [
    (dict(type="mean"), "type='mean'"), (dict(beta=0.0), "beta=0.0"), (dict(beta=1.5), "beta=1.5"),
    (dict(L_base=-3), "L_base=-3"), (dict(L_base=0), "L_base=0"), (dict(decimating_layers=[2, 2]), "repeats"),
    (dict(decimating_layers=[-1]), "non-negative"), (dict(min_seq_len=-1), "min_seq_len=-1"),
])
def test_config_rejects_bad_values(kw, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[")):
        DecimationConfig(**kw)


def test_config_rejects_unknown_keys_and_layers_out_of_range():
    with pytest.raises(ValueError, match="unknown decimation config keys"):
        DecimationConfig.from_any({"activate": True, "Lbase": 3})
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        DecimationConfig(activate=True, decimating_layers=[4]).check_layers(4)


def test_config_accepts_numpy_scalars():
    import numpy as np

    cfg = DecimationConfig(activate=True, decimating_layers=[np.int64(3)], min_seq_len=np.int64(5),
                           beta=np.float32(0.5), L_base=np.inf)
    assert cfg.decimating_layers == [3] and type(cfg.decimating_layers[0]) is int
    assert cfg.min_seq_len == 5 and cfg.beta == 0.5 and math.isinf(cfg.L_base)
    assert cfg.decimates(3)


def test_blockwise_scores_keep_the_same_tokens_as_the_full_delta(monkeypatch):
    # The mixer scores ‖Δ‖ block by block (bounded memory); the kept tokens and the layer output
    # must equal those computed from the whole Δ at once (the recording path).
    import modules.mamba_mixer as mm

    torch.manual_seed(3)
    mixer = mm.MambaMixer(d_model=16, d_state=4, layer_idx=0).double()
    hidden = torch.randn(2, 300, 16, dtype=torch.float64)
    cfg = DecimationConfig(activate=True, decimating_layers=[0], L_base=40, beta=0.5, min_seq_len=4)
    monkeypatch.setattr(mm, "SCORE_BLOCK", 64)                 # several blocks, the last one partial
    out, keep, _ = mixer(hidden, resp_len=3, decimation=cfg)
    ref, ref_keep, debug = mixer(hidden, resp_len=3, decimation=cfg, record=True)
    assert keep.shape == (2, 43) and torch.equal(keep, ref_keep)
    assert torch.equal(out, ref)
    assert torch.equal(mixer.delta_scores(mixer.project(hidden)[1]), token_scores(mixer.delta(mixer.project(hidden)[1])))


def _best_by_hand(scores, positions, k):
    """The tie rule written out: higher score first, then earlier position; -> sorted positions."""
    pairs = sorted(zip(scores.tolist(), positions.tolist()), key=lambda sp: (-sp[0], sp[1]))
    return sorted(p for _, p in pairs[:k])


def test_exact_ties_go_to_the_earlier_position():
    cfg = DecimationConfig(activate=True, decimating_layers=[0], L_base=7, min_seq_len=0)
    tied = torch.ones(2, 50)
    assert torch.equal(kept_from_scores(tied, 2, 0, cfg), torch.tensor([[0, 1, 2, 3, 4, 5, 6, 48, 49]] * 2))
    few = torch.tensor([[1.0, 3, 2, 3, 3, 0, 3, 2]])                # four 3s compete for three places
    assert kept_from_scores(few, 0, 0, DecimationConfig(activate=True, decimating_layers=[0], L_base=3,
                                                         min_seq_len=0))[0].tolist() == [1, 3, 4]
    shuffled = torch.tensor([[7, 2, 5, 0, 6, 1, 4, 3]])              # a buffer in any order: ties by position
    picked = shuffled[0, top_k_candidates(few, 3, shuffled)[0]]
    assert sorted(picked.tolist()) == _best_by_hand(few[0], shuffled[0], 3) == [0, 2, 4]


def test_streamed_merge_keeps_the_one_shot_set_on_ties():
    # A running buffer (any order) merged chunk by chunk with the same rule keeps the one-shot set,
    # here with scores drawn from 3 values so that almost every comparison is a tie.
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 3, (2, 200), generator=g).float()
    pos = torch.arange(200).expand(2, -1)
    k = 25
    buf_s, buf_p = scores[:, :0], pos[:, :0]
    for c in range(0, 200, 17):
        cand_s, cand_p = torch.cat([buf_s, scores[:, c:c + 17]], 1), torch.cat([buf_p, pos[:, c:c + 17]], 1)
        top = top_k_candidates(cand_s, k, cand_p)
        buf_s, buf_p = cand_s.gather(1, top), cand_p.gather(1, top)
    for row in range(2):
        want = _best_by_hand(scores[row], pos[row], k)
        assert sorted(buf_p[row].tolist()) == want
        one_shot = DecimationConfig(activate=True, decimating_layers=[0], L_base=k, min_seq_len=0)
        assert kept_from_scores(scores[row:row + 1], 0, 0, one_shot)[0].tolist() == want


def test_beta_one_is_valid_and_keeps_the_same_budget_at_every_layer():
    # β is in (0, 1] (the original's inactive config itself uses β = 1, reference §1.2): with β = 1
    # every decimating layer keeps L_base tokens, 10·1^s = 10 here
    cfg = DecimationConfig(activate=True, beta=1, decimating_layers=[0, 1, 2], L_base=10, min_seq_len=0)
    assert cfg.beta == 1.0
    for s, layer in enumerate(cfg.decimating_layers):
        assert num_kept(100, s, cfg.beta, cfg.L_base, cfg.min_seq_len) == 10
        assert kept_from_scores(torch.rand(1, 50), 2, layer, cfg).shape == (1, 12)


def test_scores_are_fp32_norms_even_for_a_bf16_delta():
    # ‖Δ‖₂ in fp32 whatever Δ's dtype: in bf16 (8 mantissa bits) 8.00098 rounds to 8, which would tie
    # these two tokens and hand the single place to the earlier one. Token 0: 64 channels of 1.0
    # (norm 8); token 1: the same with one channel at 1.0078125, bf16's next value above 1
    # (norm sqrt(63 + 1.0078125²) = 8.000976...).
    delta = torch.ones(1, 64, 2, dtype=torch.bfloat16)
    delta[0, 5, 1] = 1.0078125
    scores = token_scores(delta)
    assert scores.dtype == torch.float32
    want = torch.tensor([[8.0, math.sqrt(63 + 1.0078125**2)]])
    torch.testing.assert_close(scores, want, rtol=1e-6, atol=0)     # fp32 rounding of a 64-term sum
    cfg = DecimationConfig(activate=True, decimating_layers=[0], L_base=1, min_seq_len=0)
    assert kept_indices(delta, 0, 0, cfg).tolist() == [[1]]


def test_protected_tail_longer_than_the_sequence_keeps_every_position():
    # resp_len > L (a caller asking for more last tokens than the prompt has): no candidate, the
    # whole sequence is the tail, indices 0..L-1 (never negative or out of range)
    cfg = DecimationConfig(activate=True, decimating_layers=[0], L_base=2, min_seq_len=0)
    assert kept_from_scores(torch.rand(2, 3), 5, 0, cfg).tolist() == [[0, 1, 2]] * 2
