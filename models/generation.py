"""Token generation: a (possibly decimated) prefill, then one recurrent step per new token.

Official implementation: state-spaces/mamba ``mamba_ssm/utils/generation.py`` (``decode``).
As there, the output has ``max_length`` tokens in all (at least one new token is produced), the
scores cover the whole padded vocabulary, and decoding stops early once every row has emitted
``eos_token_id`` (rows that finished earlier are padded with it).
"""
from __future__ import annotations

import torch


def sample_next(logits, top_k=1, top_p=0.0, temperature=1.0, generator=None):
    """logits (b, V) -> next tokens (b,). top_k=1 is greedy (argmax)."""
    if top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits.float() / max(temperature, 1e-5)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > top_p        # keep the first token past top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids, max_length, top_k=1, top_p=0.0, temperature=1.0, eos_token_id=None,
             generator=None, prefill_chunk_size=None):
    """input_ids (b, l) -> (b, <= max_length) token ids, prompt included.

    prefill_chunk_size: stream the prompt in chunks of this many tokens (constant memory; same
    result as the one-shot prefill, see models/streaming.py).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, length) tensor, got shape {tuple(input_ids.shape)}")
    caches = model.allocate_inference_cache()
    if prefill_chunk_size:
        from models.streaming import streaming_prefill

        logits = streaming_prefill(model, input_ids, prefill_chunk_size, 1, caches).logits[:, -1]
    else:
        logits = model(input_ids, num_last_tokens=1, caches=caches).logits[:, -1]
    n_new = max(1, int(max_length) - input_ids.shape[1])
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    out = [input_ids]
    for i in range(n_new):
        tok = sample_next(logits, top_k, top_p, temperature, generator)
        if eos_token_id is not None:
            tok = tok.masked_fill(done, eos_token_id)
            done |= tok == eos_token_id
        out.append(tok[:, None])
        if i == n_new - 1 or (eos_token_id is not None and bool(done.all())):
            break
        logits = model.step(tok[:, None], caches)[:, -1]
    return torch.cat(out, dim=1)
