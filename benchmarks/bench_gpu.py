"""GPU benchmarks, side by side in one run on the same random weights (mamba-130m shape by default).

    python benchmarks/bench_gpu.py --out benchmarks/results/gpu [--lengths 2048 ... 1048576]   (or: bash benchmarks/gpu_check.sh)

Prefill = one forward of a batch-1 prompt to the last token's logits. Rows: our vanilla model and
our DeciMamba model (decimating layer 12, L_base 2000, as the passkey preset) on the kernel path;
mamba-ssm's own MambaLMHeadModel when importable; our torch-only path (<= 16K);
transformers' MambaForCausalLM slow path and its mambapy scan (<= 16K, in a separate process
without mamba-ssm: bench_hf_mamba.py). Tokens/s and peak GPU
memory, fp32 and bf16. Then a training step (batch 8 x 2K, bf16 autocast). Results are written
after every row, so a time-out keeps what was measured.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import timeit, write_results  # noqa: E402
from models import DecimatingMambaModel, MambaConfig, MambaLMHeadModel  # noqa: E402
from modules.kernels import HAS_KERNELS  # noqa: E402

COLS = ["impl", "dtype", "tokens", "seconds", "tok_per_s", "peak_GB", "ratio_vs_mamba_ssm"]


def sync():
    torch.cuda.synchronize()


def measure(fn, reps):
    torch.cuda.reset_peak_memory_stats()
    try:
        t = timeit(fn, repeats=reps, warmup=1, sync=sync)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None
    return t, torch.cuda.max_memory_allocated() / 2**30


def build(args):
    cfg = MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=50277)
    torch.manual_seed(0)
    van = MambaLMHeadModel(cfg)
    deci = DecimatingMambaModel(cfg, decimation_config=dict(activate=True, beta=0.5, L_base=2000,
                                                            decimating_layers=[args.n_layer // 2], min_seq_len=20))
    deci.load_state_dict(van.state_dict())
    impls = {"ours_vanilla": van, "ours_deci": deci}
    try:
        from mamba_ssm.models.config_mamba import MambaConfig as MC
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel as Ref

        ref = Ref(MC(d_model=args.d_model, n_layer=args.n_layer, vocab_size=50277, tie_embeddings=False))
        ref.load_state_dict(van.state_dict())
        impls["mamba_ssm"] = ref
    except Exception as exc:  # noqa: BLE001
        print(f"mamba_ssm reference unavailable: {exc}")
    return impls, cfg


def prefill_rows(impls, cfg, args, rows, out):
    torch_ref = MambaLMHeadModel(cfg)
    torch_ref.load_state_dict(impls["ours_vanilla"].state_dict())
    torch_ref.set_backend("torch")
    for dtype in (torch.bfloat16, torch.float32):
        dname = str(dtype).split(".")[-1]
        for length in args.lengths:
            ids = torch.randint(0, 50277, (1, length), device="cuda")
            base = None
            todo = list(impls.items())
            if length <= 16384:
                todo.append(("ours_torch_path", torch_ref))
            for name, model in todo:
                if time.time() > args.deadline:
                    return
                model.to("cuda", dtype).eval()
                with torch.no_grad():
                    t, mem = measure(lambda: model(ids, num_last_tokens=1), reps=3 if length <= 131072 else 1)
                model.to("cpu")
                torch.cuda.empty_cache()
                row = {"impl": name, "dtype": dname, "tokens": length, "seconds": t, "peak_GB": mem,
                       "tok_per_s": None if t is None else round(length / t)}
                if name == "mamba_ssm":
                    base = t
                rows.append(row)
                print(row, flush=True)
            for r in rows:
                if r["tokens"] == length and r["dtype"] == dname and base and r["seconds"]:
                    r["ratio_vs_mamba_ssm"] = round(base / r["seconds"], 2)
            write_results(out, rows, COLS, "GPU prefill: tokens/s and peak memory")


def streaming_rows(impls, args, rows, out):
    """Streaming (chunked) prefill of the DeciMamba model: peak memory should stay flat in length."""
    from models.streaming import streaming_prefill

    model = impls["ours_deci"].to("cuda", torch.bfloat16).eval()
    for length in args.stream_lengths:
        for chunk in args.chunk:
            if time.time() > args.deadline:
                break
            ids = torch.randint(0, 50277, (1, length), device="cuda")
            t, mem = measure(lambda: streaming_prefill(model, ids, chunk_size=chunk), reps=1)
            rows.append({"impl": f"ours_deci_streaming_{chunk}", "dtype": "bfloat16", "tokens": length, "seconds": t,
                         "peak_GB": mem, "tok_per_s": None if t is None else round(length / t)})
            print(rows[-1], flush=True)
            write_results(out, rows, COLS, "GPU prefill: tokens/s and peak memory")
    model.to("cpu")


def grid_rows(impls, args, rows, out):
    """Wall time of the passkey grid of eval preset 2 (5 depths x 1K-128K, data building included)."""
    if time.time() > args.deadline:
        return
    from configs import schema
    from custom_datasets.niah import NiahTask
    from custom_datasets.sources import load_tokenizer
    from engine.evaluate import cell_groups

    cfg, _ = schema.load(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                      "eval_ssm_config_2.json"), device="cuda:0")
    model = impls["ours_deci"].to("cuda", torch.float32).eval()
    t = time.perf_counter()
    task = NiahTask(cfg, load_tokenizer(cfg["tokenizer"]), train=False)
    with torch.no_grad():
        for cells in cell_groups(task, task.eval_cells()):         # cells of one length, batched as in evaluate
            task.run_cells(model, cells, "cuda")
    torch.cuda.synchronize()
    secs = time.perf_counter() - t
    model.to("cpu")
    tokens = sum(c["ctx_len"] for c in task.eval_cells()) * cfg["niah_samples_per_cell"]
    rows.append({"impl": "passkey_grid_eval2_ours_deci", "dtype": "float32", "tokens": tokens,
                 "seconds": round(secs, 2), "tok_per_s": round(tokens / secs)})
    print(rows[-1], flush=True)
    write_results(out, rows, COLS, "GPU prefill: tokens/s and peak memory")


def hf_rows(cfg, args, rows, out):
    """transformers' slow path and mambapy scan, in a process where mamba-ssm cannot load (in this
    one transformers would silently use mamba-ssm's kernel: bench_hf_mamba.py)."""
    import json
    import subprocess

    left = int(args.deadline - time.time())
    if left < 10:
        return
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_hf_mamba.py")
    cmd = [sys.executable, script, "--lengths", "2048", "16384", "--d-model", str(cfg.d_model),
           "--n-layer", str(cfg.n_layer), "--max-seconds", str(left)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=left + 60)
    except subprocess.TimeoutExpired:
        return
    for line in res.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            if "tokens" in row:
                rows.append({k: row.get(k) for k in COLS})
            print(row, flush=True)
    if res.returncode:
        print(res.stderr[-2000:], flush=True)
    write_results(out, rows, COLS, "GPU prefill: tokens/s and peak memory")


def profile_rows(impls, args, out):
    """Where the time goes: CUDA kernel time by kernel, one bf16 prefill at --profile-len tokens,
    for each model on the kernel path (torch.profiler; written to <out>_profile.md)."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, 50277, (1, args.profile_len), device="cuda")
    parts = [f"# CUDA time by kernel, bf16 prefill of {args.profile_len} tokens (batch 1)", ""]
    for name in ("ours_vanilla", "ours_deci", "mamba_ssm"):
        if name not in impls or time.time() > args.deadline:
            continue
        model = impls[name].to("cuda", torch.bfloat16).eval()
        with torch.no_grad():
            model(ids, num_last_tokens=1)
            sync()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                model(ids, num_last_tokens=1)
                sync()
        model.to("cpu")
        torch.cuda.empty_cache()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
        parts += [f"## {name}", "", "```", table, "```", ""]
        with open(out + "_profile.md.tmp", "w") as f:
            f.write("\n".join(parts))
        os.replace(out + "_profile.md.tmp", out + "_profile.md")
        print(f"profiled {name}", flush=True)


def train_rows(impls, args, rows, out):
    # ours_vanilla_triton_scan: DECIMAMBA_SCAN=triton and no fused mamba_inner_fn, so the scan's forward and
    # backward run in Triton (modules/triton_scan*.py), what trains on a machine without compiled mamba-ssm;
    # there ours_vanilla runs the same (DECIMAMBA_SCAN's default 'auto'), where mamba-ssm is installed its kernels
    for name in ("ours_vanilla", "ours_vanilla_triton_scan", "ours_deci", "mamba_ssm"):
        base = name.replace("_triton_scan", "")
        if base not in impls or time.time() > args.deadline:
            continue
        model = impls[base].to("cuda", torch.float32).train()
        triton_scan = name.endswith("_triton_scan")
        scan_env = os.environ.get("DECIMAMBA_SCAN", "")
        os.environ["DECIMAMBA_SCAN"] = "triton" if triton_scan else scan_env
        for layer in getattr(getattr(model, "backbone", None), "layers", []):
            if hasattr(layer.mixer, "use_fast_path"):
                layer.mixer.use_fast_path = not triton_scan
        ids = torch.randint(0, 50277, (8, 2048), device="cuda")

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(ids, num_last_tokens=8).logits
            F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, -7:].reshape(-1)).backward()
        t, mem = measure(step, reps=3)
        model.zero_grad(set_to_none=True)
        model.to("cpu")
        os.environ["DECIMAMBA_SCAN"] = scan_env
        rows.append({"impl": f"train_step_{name}", "dtype": "bf16-autocast", "tokens": 8 * 2048, "seconds": t,
                     "peak_GB": mem, "tok_per_s": None if t is None else round(8 * 2048 / t)})
        print(rows[-1], flush=True)
        write_results(out, rows, COLS, "GPU prefill: tokens/s and peak memory")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 16384, 131072, 1048576])
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--n-layer", type=int, default=24)
    ap.add_argument("--max-seconds", type=float, default=240)
    ap.add_argument("--stream-lengths", type=int, nargs="*", default=[1048576, 10485760])
    ap.add_argument("--chunk", type=int, nargs="+", default=[65536, 32768], help="streaming chunk sizes to compare")
    ap.add_argument("--out", default="benchmarks/results/gpu")
    ap.add_argument("--profile-len", type=int, default=131072, help="prompt length of the profiled prefill (0: none)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["prefill", "grid", "streaming", "train", "hf", "profile"])
    args = ap.parse_args()
    args.deadline = time.time() + args.max_seconds
    print(f"kernels importable: {HAS_KERNELS}")
    impls, cfg = build(args)
    rows = []
    steps = [("prefill", lambda: prefill_rows(impls, cfg, args, rows, args.out)),
             ("hf", lambda: hf_rows(cfg, args, rows, args.out)),
             ("streaming", lambda: streaming_rows(impls, args, rows, args.out)),
             ("profile", lambda: args.profile_len and profile_rows(impls, args, args.out)),
             ("grid", lambda: grid_rows(impls, args, rows, args.out)),
             ("train", lambda: train_rows(impls, args, rows, args.out))]
    for name, step in steps:
        if name not in args.skip:
            step()
    write_results(args.out, rows, COLS, "GPU prefill: tokens/s and peak memory",
                  f"Model: {args.n_layer} layers, d_model {args.d_model} (mamba-130m shape), random weights, batch 1 "
                  "prefill to the last token's logits; ours_deci decimates at layer n_layer/2 with L_base 2000. "
                  "ratio_vs_mamba_ssm > 1: faster than mamba-ssm's MambaLMHeadModel in the same run.")


if __name__ == "__main__":
    main()
