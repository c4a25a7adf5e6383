"""A table of the scan kernels' key Nsight Compute figures from ncu's text reports (benchmarks/gpu_scan.sh).

    python benchmarks/ncu_table.py benchmarks/results/ncu_h200/*.txt.xz     (plain .txt too)

One row per profiled kernel whose name starts with _scan_kernel, _carry_kernel or selective_scan_fwd: its grid,
duration, the transcendental pipe's (XU: the exponentials) and the issue slots' share of peak, warps per
scheduler (active, eligible), the cycles between a warp's instructions and how many of them it waits on
memory (long scoreboard), registers per thread.
"""
from __future__ import annotations

import lzma
import os
import re
import sys

FIELDS = [("ms", r"Duration\s+(\w+)\s+([\d.,]+)"),
          ("xu_pct", r"sm__inst_executed_pipe_xu\.avg\.pct_of_peak_sustained_active\s+%\s+([\d.,]+)"),
          ("issue_pct", r"smsp__issue_active\.avg\.pct_of_peak_sustained_active\s+%\s+([\d.,]+)"),
          ("warps", r"\n\s+Active Warps Per Scheduler\s+warp\s+([\d.,]+)"),
          ("eligible", r"\n\s+Eligible Warps Per Scheduler\s+warp\s+([\d.,]+)"),
          ("cycles_per_issue", r"Warp Cycles Per Issued Instruction\s+cycle\s+([\d.,]+)"),
          ("long_scoreboard", r"Stall Long Scoreboard\s+inst\s+([\d.,]+)"),
          ("registers", r"Registers Per Thread\s+register/thread\s+([\d.,]+)")]
KERNELS = ("_scan_kernel", "_carry_kernel", "void selective_scan_fwd")


def rows(path):
    with (lzma.open(path, "rt") if path.endswith(".xz") else open(path)) as f:
        text = f.read()
    parts = re.split(r"\n  (?=\S)", text)           # a kernel's block starts at a two-space-indented name
    for part in parts:
        head = part.split("\n", 1)[0]
        if not head.startswith(KERNELS):
            continue
        row = dict(report=os.path.basename(path).removesuffix(".xz").removesuffix(".txt"), kernel=head.split(" (")[0][:24],
                   grid=re.search(r"\(([\d, ]+)\)x\(([\d, ]+)\)", head).group(0))
        for key, pat in FIELDS:
            m = re.search(pat, part)
            if m is None:
                row[key] = ""
            elif key == "ms":
                unit, val = m.group(1), float(m.group(2).replace(",", ""))
                row[key] = round(val / 1000 if unit == "us" else val, 3)
            else:
                row[key] = m.group(1)
        yield row


def main(paths):
    if not paths:
        sys.exit("usage: python benchmarks/ncu_table.py NCU_REPORT.txt ...")
    cols = ["report", "kernel", "grid", "ms", "xu_pct", "issue_pct", "warps", "eligible", "cycles_per_issue",
            "long_scoreboard", "registers"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for path in paths:
        for r in rows(path):
            print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
