"""benchmarks/ncu_table.py reads the committed Nsight Compute reports (benchmarks/results/ncu_h200/): the figures
quoted in scan_profile_h200.md, kernel by kernel, in launch order."""
import os

from benchmarks import ncu_table

REPORTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results", "ncu_h200")


def test_rows_of_the_default_profile():
    rows = list(ncu_table.rows(os.path.join(REPORTS, "triton_default.txt.xz")))
    assert [r["kernel"] for r in rows] == ["_scan_kernel", "_carry_kernel", "_scan_kernel"]   # pass 1, carry, pass 3
    p1, carry, p3 = rows
    assert p1["grid"] == "(1, 24, 43)x(64, 1, 1)" and p1["ms"] == 1.73 and p1["xu_pct"] == "51.15"
    assert p1["long_scoreboard"] == "3.44" and p1["registers"] == "104" and p1["warps"] == "3.79"
    assert carry["ms"] == 0.015                      # 15.10 us, converted
    assert p3["ms"] == 1.97 and p3["issue_pct"] == "47.07" and p3["registers"] == "128"


def test_rows_of_mamba_ssm():
    (row,) = ncu_table.rows(os.path.join(REPORTS, "mamba_ssm.txt.xz"))
    assert row["kernel"].startswith("void selective_scan_fwd") and row["ms"] == 4.49 and row["xu_pct"] == "20.65"
