"""Small models and an independent per-token oracle of the (decimated) forward, for tests."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models import DecimatingMambaModel, MambaConfig, MambaLMHeadModel


def tiny_config(**kw) -> MambaConfig:
    base = dict(d_model=32, n_layer=4, vocab_size=61, ssm_cfg={"d_state": 8}, pad_vocab_size_multiple=8)
    base.update(kw)
    return MambaConfig(**base)


def randomize(model, seed=0):
    """Make every parameter non-trivial (fresh models have D = 1, zero biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=g) * 4 + 0.5))
            elif name.endswith(("norm.weight", "norm_f.weight")):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("dt_proj.bias"):
                p.copy_(torch.randn(p.shape, generator=g) - 2)
            elif name.endswith("dt_bias"):                      # Mamba-2's Δ bias, one per head
                p.copy_(torch.randn(p.shape, generator=g) - 1)
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def make_pair(cfg=None, deci=None, seed=0):
    cfg = cfg or tiny_config()
    v = randomize(MambaLMHeadModel(cfg), seed)
    d = DecimatingMambaModel(cfg, decimation_config=deci)
    d.load_state_dict(v.state_dict())
    return v, d


def spec_num_kept(l_dec, s, beta, L_base, min_seq_len):
    """Reference spec §2.4 step 6, written out: k = int(max(min(L_dec, L_base·β^s), min_seq_len)),
    all of L_dec when L_base is inf, and never more than the L_dec candidates that exist (§9)."""
    if math.isinf(L_base):
        return l_dec
    return min(int(max(min(l_dec, L_base * beta**s), min_seq_len)), l_dec)


def oracle_logits(model, ids, resp_len, deci):
    """Independent re-derivation of the DeciMamba forward (batch 1, per-token loops), from the
    reference spec §2.1-2.5, sharing no code with modules/ beyond parameter access."""
    assert ids.shape[0] == 1
    bb = model.backbone
    hidden = bb.embedding.weight[ids[0]]                                    # (l, d)
    residual = None
    kept_all = []
    for i, layer in enumerate(bb.layers):
        residual = hidden if residual is None else hidden + residual
        h = _norm(layer.norm, residual)
        mx = layer.mixer
        xz = h @ mx.in_proj.weight.t()                                      # (l, 2e)
        x, z = xz.chunk(2, dim=-1)
        L = x.shape[0]
        w = mx.conv1d.weight[:, 0]                                          # (e, k)
        xp = torch.cat([torch.zeros(w.shape[1] - 1, x.shape[1]), x])
        u = torch.stack([(xp[t:t + w.shape[1]].t() * w).sum(-1) for t in range(L)]) + mx.conv1d.bias
        u = F.silu(u)                                                       # (l, e)
        dbc = u @ mx.x_proj.weight.t()
        dt, B, C = dbc.split([mx.dt_rank, mx.d_state, mx.d_state], dim=-1)
        delta = F.softplus(dt @ mx.dt_proj.weight.t() + mx.dt_proj.bias)    # (l, e)
        keep = torch.arange(L)
        if deci and deci["activate"] and i in deci["decimating_layers"]:
            s = deci["decimating_layers"].index(i)
            l_dec = L - resp_len
            k = spec_num_kept(l_dec, s, deci["beta"], deci["L_base"], deci["min_seq_len"])
            score = delta[:l_dec].norm(dim=-1).tolist()
            # the k largest ‖Δ‖, an exact tie to the earlier token (this repo's rule; the spec leaves ties open)
            top = sorted(sorted(range(l_dec), key=lambda t: (-score[t], t))[:k])
            keep = torch.tensor(top + list(range(l_dec, L)), dtype=torch.long)
            kept_all.append((i, keep))
        u, delta, B, C, z = u[keep], delta[keep], B[keep], C[keep], z[keep]
        A = -torch.exp(mx.A_log)
        state = torch.zeros_like(A)
        ys = []
        for t in range(len(keep)):
            state = torch.exp(delta[t][:, None] * A) * state + (delta[t] * u[t])[:, None] * B[t][None]
            ys.append(state @ C[t] + mx.D * u[t])
        y = torch.stack(ys) * F.silu(z)
        hidden = y @ mx.out_proj.weight.t()
        residual = residual[keep]
    out = _norm(bb.norm_f, hidden + residual)
    return (out @ model.lm_head.weight.t())[None], kept_all


def _norm(norm, x):
    if hasattr(norm, "bias") and norm.bias is not None:
        return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def oracle_prefill_then_steps(model, ids, prompt_len, deci):
    """Logits (1, l - prompt_len + 1, V) of a (decimated) prefill of ids[:, :prompt_len] followed by
    one recurrent step per remaining token, each position predicting the next.

    From the spec §2.6-2.7: the prefill protects its last token and the steps are never decimated,
    so the tokens from the last prompt token on are the protected tail of one sequence. In it each
    layer's recurrence runs over its kept prompt tokens, then over the tail; a decimating layer's
    conv sees all of its input (the conv precedes decimation), a later layer's only the kept tokens,
    as the decode caches hold. The scores and the budget k depend only on the prompt's candidates
    (causal layers; L_dec = prompt_len - 1 either way), so this is ``oracle_logits`` of the whole
    sequence with that tail.
    """
    tail = ids.shape[1] - prompt_len + 1
    out, _ = oracle_logits(model, ids, tail, deci)
    return out[:, -tail:]                                  # the decimated length ends with the tail


# ---------------------------------------------------------------- bf16 error budgets (tests/test_gpu.py)
BF16_UNIT_ROUNDOFF = 2.0**-8       # bf16 keeps 8 significand bits: one rounding errs by <= 2^-8 ≈ 3.9e-3 relative


def rel_err(got, ref) -> float:
    """‖got - ref‖ / ‖ref‖, in fp32."""
    got, ref = got.float(), ref.float()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# bf16 budgets: relative norm error of a bf16-autocast path against the fp32 reference, for the
# 4-layer test models of the GPU tests. Each bf16 rounding errs by <= u = 2^-8 ≈ 3.9e-3. On the way
# to the logits each layer rounds ~12 tensors (inputs and weights of in_proj, x_proj, dt_proj,
# out_proj; the conv, scan and norm outputs) and the head 2: ~50 roundings, which add up at random
# to sqrt(50)·u ≈ 2.8e-2; 4e-2 gives 1.4x headroom (the Mamba-1 torch path under CPU autocast, 1K
# tokens: 1.4e-2 vanilla, 2.1e-2 deci). A kernel 4% off fails it.
LOGITS_BF16 = 4e-2
# Gradients, per parameter tensor: the backward repeats the forward's roundings and adds about as
# many of its own, sqrt(2) x the forward estimate ≈ 4e-2; 1e-1 also covers the deci model's kept-set
# flips, each of which moves a whole token's contribution (CPU autocast, 1K tokens, worst tensor:
# 2.8e-2 vanilla, 5.6e-2 deci).
GRADS_BF16 = 1e-1


def fwd_bwd(model, ids, backend, resp=8, autocast=False):
    """(output, loss, {name: grad}) of one forward + backward on ``backend``, bf16 autocast if asked."""
    model.set_backend(backend)
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(ids, num_last_tokens=resp)
    loss = F.cross_entropy(out.logits[0, :-1].float(), ids[0, -resp + 1:])
    loss.backward()
    return out, loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def replayed_grad_errors(model, ids, run, ref, top=5) -> list[dict]:
    """Rows {what, rel_err}: relative-norm errors of the logits and the ``top`` largest gradient errors of ``run``
    against ``ref`` (each a callable (model, ids) -> fwd_bwd's triple). ``ref`` keeps the tokens ``run`` kept (the
    Mamba-2 selections replayed layer by layer), so only the arithmetic differs."""
    from modules import mamba2_mixer

    out, _, grads = run(model, ids)
    saved = mamba2_mixer.kept_from_scores
    if out.kept_indices:
        replay = iter([keep.unsqueeze(0) for _, keep in out.kept_indices])
        mamba2_mixer.kept_from_scores = lambda *args: next(replay)
    try:
        ref_out, _, ref_grads = ref(model, ids)
        if out.kept_indices:
            assert next(replay, None) is None, "the reference run selected fewer times than the first"
    finally:
        mamba2_mixer.kept_from_scores = saved
    errs = sorted(((rel_err(grads[n], ref_grads[n]), n) for n in ref_grads), reverse=True)[:top]
    return [dict(what="logits", rel_err=rel_err(out.logits, ref_out.logits))] + \
        [dict(what=f"grad {n}", rel_err=e) for e, n in errs]


def extract_mamba_ssm(sdist: str, dest: str) -> str:
    """mamba-ssm's Python package from its source archive into dest, beside a stand-in for its compiled Mamba-1
    scan (selective_scan_cuda, which mamba_ssm imports and the SSD kernels never call); returns the folder to put
    on the path."""
    import os
    import tarfile

    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and "/mamba_ssm/" in m.name and m.name.endswith(".py")]
        tar.extractall(dest, members=members, filter="data")
    top = os.path.join(dest, members[0].name.split("/")[0])
    with open(os.path.join(top, "selective_scan_cuda.py"), "w") as f:
        f.write("def __getattr__(name):\n    raise RuntimeError('selective_scan_cuda: a stand-in, not built')\n")
    return top


def over_budget(outputs: dict, ref, budget: float) -> dict:
    """{name: error} of the outputs (name -> tensor) farther than ``budget`` (relative norm error)
    from the fp32 reference ``ref``; empty when every one is within it."""
    errors = {name: rel_err(t, ref) for name, t in outputs.items()}
    return {name: e for name, e in errors.items() if not e <= budget}


def one_line_stderr(capsys, *needles) -> str:
    """The captured stderr: one line, no traceback, holding every needle."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def usage_error_is_one_line(main, argv, capsys, *needles) -> str:
    """main(argv) stops at argument parsing with exit status 2 and one line on stderr holding every needle."""
    import pytest

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return one_line_stderr(capsys, *needles)


def prompt_positions(kept_indices):
    """LMOutput.kept_indices -> [(layer, kept positions in the prompt)], (k,) for batch 1, (b, k) per row
    otherwise. Each layer's indices point into its own input, the previous decimating layer's kept
    tokens: compared raw, one flipped near-tie at an earlier layer shifts every later index."""
    out, pos = [], None
    for layer, idx in kept_indices:
        pos = idx if pos is None else (pos[idx] if idx.dim() == 1 else pos.gather(1, idx))
        out.append((layer, pos))
    return out


def run_in_interpreter(module: str, call: str, timeout: int = 900) -> str:
    """Run ``from <module> import ...; <call>`` of a tests/ module in a fresh process with Triton's
    interpreter on (TRITON_INTERPRET=1 must be set before Triton compiles anything); assert it exits 0
    and return its stdout."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    name = call.split("(")[0]
    code = f"import sys; sys.path.insert(0, 'tests'); from {module} import {name}; {call}"
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res.stdout


def files_digest(folder) -> str:
    """engine.results.weights_digest written out independently (tests compare a tool's recorded digest with
    it): sha256 over 'name:sha256(bytes)' lines of config.json then model.safetensors, first 16 hex digits."""
    import hashlib
    from pathlib import Path

    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        h.update(f"{name}:{hashlib.sha256((Path(folder) / name).read_bytes()).hexdigest()}\n".encode())
    return "files-sha256:" + h.hexdigest()[:16]


def checkpoint_eval(tmp_path, config: str, checkpoint: str, name: str, *sets: str) -> list[dict]:
    """finetune_ssm.py with ``config`` on ``checkpoint`` (CPU, run ``name`` under tmp_path; each of ``sets``
    a key=value override): the run's result records."""
    import json

    import finetune_ssm

    args = ["--config", config, "--device", "cpu", "--run-name", name, "--set", f"output_dir={tmp_path}",
            "--set", f"load_cp={checkpoint}"]
    for kv in sets:
        args += ["--set", kv]
    assert finetune_ssm.main(args) == 0
    with open(tmp_path / name / "results.jsonl") as f:
        return [json.loads(line) for line in f]
