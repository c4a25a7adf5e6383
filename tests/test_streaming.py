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


@pytest.mark.parametrize("length", [1, 2, 3])
def test_prompt_no_longer_than_the_protected_tail_streams_as_one_shot(length):
    # No token is a candidate at the decimating layer (L_dec = L - resp <= 0): the streamed
    # prefill used to sort an empty buffer (None) and crash.
    _, model = make_pair(deci=DECI)
    ids = torch.randint(0, 61, (1, length))
    assert torch.equal(model.generate(ids, length + 4, prefill_chunk_size=16), model.generate(ids, length + 4))
    one = model(ids, num_last_tokens=3)
    got = streaming_prefill(model, ids, chunk_size=16, num_last_tokens=3)     # tail longer than the prompt
    torch.testing.assert_close(got.logits, one.logits, **FP32)
    assert all(torch.equal(a, torch.arange(length)) and torch.equal(a, b)
               for (_, a), (_, b) in zip(got.kept_indices, one.kept_indices))


def test_exact_score_ties_keep_the_earliest_tokens_streamed_and_one_shot():
    # A zero dt projection makes Δ = softplus(dt_bias) for every token: all ‖Δ‖ scores are exactly
    # equal at both decimating layers. The rule breaks ties by position, so each layer keeps its
    # first k candidates (+ the tail), in one shot and through the streamed buffer alike.
    _, model = make_pair(deci=DECI)
    with torch.no_grad():
        for i in DECI["decimating_layers"]:
            model.backbone.layers[i].mixer.dt_proj.weight.zero_()
    ids = torch.randint(0, 61, (1, 301))
    one = model(ids, num_last_tokens=1)
    got = streaming_prefill(model, ids, chunk_size=37, num_last_tokens=1)
    # layer 1 (s=0): k = 60 of 300 candidates; layer 3 (s=1): k = 30 of its 60 (the tail is last)
    assert torch.equal(one.kept_indices[0][1], torch.tensor(list(range(60)) + [300]))
    assert torch.equal(one.kept_indices[1][1], torch.tensor(list(range(30)) + [60]))
    for (_, a), (_, b) in zip(got.kept_indices, one.kept_indices):
        assert torch.equal(a, b)
    torch.testing.assert_close(got.logits, one.logits, **FP32)


def test_unordered_decimating_layers_stream_as_one_shot():
    # s is the layer's position in the list, not its depth: with [3, 1], layer 1 (the first to run)
    # is s = 1 and keeps int(60·0.5) = 30 of 299 candidates + the 2-token tail; layer 3 (s = 0,
    # budget 60) then keeps all 30 + 2 left. The stream must start its buffer at layer 1 with that k.
    deci = {**DECI, "decimating_layers": [3, 1]}
    _, model = make_pair(deci=deci)
    ids = torch.randint(0, 61, (1, 301))
    one = model(ids, num_last_tokens=2)
    got = streaming_prefill(model, ids, chunk_size=37, num_last_tokens=2)
    assert [i for i, _ in got.kept_indices] == [1, 3]
    first = got.kept_indices[0][1]
    assert first.shape == (32,) and torch.equal(first[-2:], torch.tensor([299, 300]))
    assert torch.equal(got.kept_indices[1][1], torch.arange(32))
    for (_, a), (_, b) in zip(got.kept_indices, one.kept_indices):
        assert torch.equal(a, b)
    torch.testing.assert_close(got.logits, one.logits, **FP32)


def test_listed_layers_with_decimation_off_stream_as_vanilla():
    # activate=False is exact vanilla Mamba whatever the other settings: every layer streams, no token
    # is dropped, and each listed layer reports all positions, in layer order (as one shot does)
    vanilla, model = make_pair(deci={**DECI, "activate": False, "decimating_layers": [3, 1]})
    ids = torch.randint(0, 61, (2, 150))
    got = streaming_prefill(model, ids, chunk_size=37, num_last_tokens=2)
    torch.testing.assert_close(got.logits, vanilla(ids, num_last_tokens=2).logits, **FP32)
    assert [i for i, _ in got.kept_indices] == [1, 3]
    assert all(torch.equal(k, torch.arange(150).expand(2, -1)) for _, k in got.kept_indices)

