"""transformers' MambaForCausalLM without mamba-ssm: its sequential "slow" path and its mambapy scan.

    python benchmarks/bench_hf_mamba.py [--lengths 2048 16384] [--d-model 768 --n-layer 24] [--device cuda]

Run as its own process because transformers swaps in mamba-ssm's kernel whenever mamba-ssm imports
(in a process that imported it, both "slow" rows timed the kernel: benchmarks/results/README.md).
Here mamba_ssm, selective_scan_cuda and causal_conv1d are blocked before transformers loads, and the
script checks which scan function it got. Prints one JSON row per line (bench_gpu.py collects them).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

for _mod in ("mamba_ssm", "selective_scan_cuda", "causal_conv1d", "causal_conv1d_cuda"):
    sys.modules[_mod] = None            # import of any of these now raises ImportError

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import timeit  # noqa: E402


def scan_impl() -> str:
    import transformers.models.mamba.modeling_mamba as mm

    fn = mm.mamba_selective_scan
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__name__', type(fn).__name__)}"


def rows(lengths, d_model, n_layer, device, max_seconds):
    from transformers import MambaConfig, MambaForCausalLM
    from transformers.utils.import_utils import is_mambapy_available

    impl = scan_impl()
    if "mamba_ssm" in impl:
        raise SystemExit(f"transformers still uses a kernel ({impl}); these rows would not time its torch paths")
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=50280, hidden_size=d_model, state_size=16, num_hidden_layers=n_layer,
                                         expand=2, conv_kernel=4, use_bias=False, use_conv_bias=True,
                                         time_step_rank=math.ceil(d_model / 16))).to(device).eval()
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    deadline = time.time() + max_seconds
    for mambapy in (False, True):
        name = "transformers_mambapy" if mambapy else "transformers_slow"
        if mambapy and not is_mambapy_available():
            yield {"impl": name, "dtype": "float32", "note": "mambapy not installed"}
            continue
        for layer in model.backbone.layers:
            layer.mixer.use_mambapy = mambapy
        for length in lengths:
            if time.time() > deadline:
                return
            ids = torch.randint(0, 50277, (1, length), device=device)
            with torch.no_grad():
                t = timeit(lambda: model(ids, logits_to_keep=1), repeats=1, warmup=1 if length <= 4096 else 0, sync=sync)
            yield {"impl": name, "dtype": "float32", "tokens": length, "seconds": round(t, 4),
                   "tok_per_s": round(length / t), "scan": impl}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 16384])
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--n-layer", type=int, default=24)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-seconds", type=float, default=120)
    args = ap.parse_args(argv)
    for row in rows(args.lengths, args.d_model, args.n_layer, args.device, args.max_seconds):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
