"""Streaming (chunked) prefill equals the one-shot forward: logits, kept tokens and decode states."""
import pytest
import torch

from models.streaming import streaming_prefill
from tests.helpers import make_pair

DECI = dict(activate=True, beta=0.5, L_base=60, decimating_layers=[1, 3], min_seq_len=5)
FP32 = dict(rtol=1e-4, atol=1e-4)   # chunked scans sum in another order than one pass: fp32 rounding


@pytest.mark.parametrize("deci", [None, DECI, {**DECI, "decimating_layers": [2]}], ids=["vanilla", "deci", "deci-one"])
@pytest.mark.parametrize("chunk", [7, 37, 1000])
@pytest.mark.parametrize("last", [1, 3])
def test_streaming_equals_one_shot(deci, chunk, last):
    _, model = make_pair(deci=deci)
    ids = torch.randint(0, 61, (2, 301))
    one = model(ids, num_last_tokens=last)
    got = streaming_prefill(model, ids, chunk_size=chunk, num_last_tokens=last)
    torch.testing.assert_close(got.logits, one.logits, **FP32)
    assert [i for i, _ in got.kept_indices] == [i for i, _ in one.kept_indices]
    for (_, a), (_, b) in zip(got.kept_indices, one.kept_indices):
        assert torch.equal(a, b)


def test_streaming_caches_continue_decoding():
    _, model = make_pair(deci=DECI)
    ids = torch.randint(0, 61, (1, 250))
    c1, c2 = model.allocate_inference_cache(), model.allocate_inference_cache()
    model(ids, num_last_tokens=1, caches=c1)
    streaming_prefill(model, ids, chunk_size=64, caches=c2)
    tok = torch.tensor([[5]])
    for _ in range(5):
        a, b = model.step(tok, c1), model.step(tok, c2)
        torch.testing.assert_close(a, b, **FP32)
        tok = a[:, -1].argmax(-1, keepdim=True)


def test_bad_chunk_size():
    _, model = make_pair()
    with pytest.raises(ValueError, match="chunk_size=0"):
        streaming_prefill(model, torch.zeros(1, 5, dtype=torch.long), chunk_size=0)


def test_generate_with_streaming_prefill():
    _, model = make_pair(deci=DECI)
    ids = torch.randint(0, 61, (2, 200))
    assert torch.equal(model.generate(ids, 210, prefill_chunk_size=48), model.generate(ids, 210))
