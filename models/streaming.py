"""Streaming (chunked) prefill: a prompt of any length in constant memory, same result as one shot.

The layers before the first decimating layer ℓ* run chunk by chunk, carrying their conv and SSM
states (exact: the scan continues from the previous chunk's state). At ℓ* each chunk's candidates
are scored by ‖Δ‖ and merged into a running top-k buffer holding what the scan needs (x, dt, B, C,
z) and the residual row, so at most k + chunk tokens are ever held. After the last chunk the
buffer is sorted into sequence order, the protected tail appended, ℓ*'s scan runs on the kept
tokens, and the deeper layers run once on that short sequence, exactly as in the one-shot forward.
Without decimation every layer streams. The caches it fills serve ``generate``'s recurrent steps.

Peak memory is O(chunk · d_inner · layers-in-flight + k): flat in the prompt length.
"""
from __future__ import annotations

import torch

from models.mamba_lm import LMOutput
from modules.block import add_norm
from modules.decimation import DecimationConfig, gather_tokens, num_kept, top_k_candidates


class _TopK:
    """Running top-k over chunks of candidates, each with its per-token tensors. The selection is
    modules/decimation.py's ``top_k_candidates`` (ties to the earlier position), as in one shot."""

    def __init__(self, k: int):
        self.k, self.score, self.pos, self.parts = k, None, None, None

    def add(self, score, pos, parts: dict):
        """score, pos (b, m); parts: name -> (tensor, dim of the token axis)."""
        if self.score is not None:
            score = torch.cat([self.score, score], 1)
            pos = torch.cat([self.pos, pos], 1)
            parts = {n: (torch.cat([self.parts[n][0], t], d), d) for n, (t, d) in parts.items()}
        if score.shape[1] > self.k:
            top = top_k_candidates(score, self.k, pos)
            score, pos = score.gather(1, top), pos.gather(1, top)
            parts = {n: (gather_tokens(t, top, d), d) for n, (t, d) in parts.items()}
        self.score, self.pos, self.parts = score, pos, parts


@torch.no_grad()
def streaming_prefill(model, input_ids, chunk_size: int = 32768, num_last_tokens: int = 1, caches=None) -> LMOutput:
    """Equal to ``model(input_ids, num_last_tokens, caches)`` (up to fp rounding), in bounded memory.

    num_last_tokens must be >= 1 (a streamed prompt returns only its last positions' logits).
    The default chunk keeps the 130m shape under 4 GB at any length (H200, bf16: 2.6 GB at 1M and
    3.1 GB at 10M tokens vs 4.9 GB with 64K chunks, 3% slower; benchmarks/results/README.md).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    if num_last_tokens < 1:
        raise ValueError(f"num_last_tokens={num_last_tokens}: streaming returns the last >= 1 positions' logits")
    bsz, length = input_ids.shape
    bb, dec = model.backbone, model.decimation
    resp = min(num_last_tokens, length) if model.decimating else 0
    active = [i for i in dec.decimating_layers if dec.activate]
    first = min(active) if active else len(bb.layers)
    caches = caches if caches is not None else model.allocate_inference_cache()
    off = DecimationConfig()
    l_dec = length - resp
    buf = tail = None
    last_hidden = last_residual = None
    if first < len(bb.layers):
        s = dec.decimating_layers.index(first)
        buf = _TopK(num_kept(l_dec, s, dec.beta, dec.L_base, dec.min_seq_len))
        tail = []
    for c0 in range(0, length, chunk_size):
        ids = input_ids[:, c0:c0 + chunk_size]
        hidden, residual = bb.embedding(ids), None
        for i in range(first):
            hidden, residual, _, _ = bb.layers[i](hidden, residual, decimation=off, cache=caches[i])
        if buf is None:                                  # keep the last num_last_tokens rows seen so far
            keep_n = max(num_last_tokens, 1)
            if last_hidden is not None:
                hidden, residual = torch.cat([last_hidden, hidden], 1), torch.cat([last_residual, residual], 1)
            last_hidden, last_residual = hidden[:, -keep_n:], residual[:, -keep_n:]
            continue
        layer = bb.layers[first]
        h, residual = add_norm(layer.norm, hidden, residual, layer.residual_in_fp32, layer.mixer.backend)
        x, dt, B, C, z = layer.mixer.project(h, caches[first])
        pos = torch.arange(c0, c0 + ids.shape[1], device=ids.device).expand(bsz, -1)
        td = getattr(layer.mixer, "token_dim", 2)          # token axis of project()'s tensors (Mamba-2: 1)
        parts = {"x": (x, td), "dt": (dt, td), "z": (z, td), "B": (B, td), "C": (C, td), "res": (residual, 1)}
        n_cand = max(0, min(ids.shape[1], l_dec - c0))
        if n_cand:
            cand = {n: (t.narrow(d, 0, n_cand), d) for n, (t, d) in parts.items()}
            buf.add(layer.mixer.delta_scores(dt.narrow(td, 0, n_cand)), pos[:, :n_cand], cand)
        if n_cand < ids.shape[1]:
            tail.append({n: (t.narrow(d, n_cand, ids.shape[1] - n_cand), d) for n, (t, d) in parts.items()})
    kept = []
    if buf is None:
        hidden, residual = last_hidden, last_residual
    else:
        parts, positions = {}, torch.empty(bsz, 0, dtype=torch.long, device=input_ids.device)
        if buf.pos is not None:                              # None: no candidate (prompt <= protected tail)
            order = torch.sort(buf.pos, dim=1)
            parts = {n: gather_tokens(t, order.indices, d) for n, (t, d) in buf.parts.items()}
            positions = order.values
        for piece in tail:                                   # the protected tail, in order
            parts = {n: (torch.cat([parts[n], t], d) if n in parts else t) for n, (t, d) in piece.items()}
        if resp:
            positions = torch.cat([positions, torch.arange(l_dec, length, device=input_ids.device).expand(bsz, -1)], 1)
        mixer = bb.layers[first].mixer
        hidden = mixer.scan(parts["x"], parts["dt"], parts["B"], parts["C"], parts["z"], caches[first])
        residual = parts["res"]
        kept.append((first, positions[0] if bsz == 1 else positions))
        for i in range(first + 1, len(bb.layers)):
            hidden, residual, keep, _ = bb.layers[i](hidden, residual, resp_len=resp, decimation=dec, cache=caches[i])
            if keep is not None:
                if keep.shape[1] < residual.shape[1]:
                    residual = gather_tokens(residual, keep, 1)
                kept.append((i, keep[0] if bsz == 1 else keep))
    if not dec.activate:                                     # listed layers report every position
        every = torch.arange(length, device=input_ids.device)
        kept = [(i, every if bsz == 1 else every.expand(bsz, -1)) for i in sorted(dec.decimating_layers)]
    hidden = bb._final_norm(hidden, residual)
    if num_last_tokens > 0:
        hidden = hidden[:, -num_last_tokens:]
    return LMOutput(model.lm_head(hidden), kept, None)
