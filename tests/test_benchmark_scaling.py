"""Smoke test of benchmarks/benchmark_scaling.py --quick (tiny widths, batch 1-2, one SAD K): it runs
end to end and writes a table, CSV and PNG whose rows carry both paths. No timing is asserted."""

import csv

import pytest

pytest.importorskip("matplotlib", reason="benchmark_scaling plots with matplotlib")


def test_quick_scaling_run_writes_table_csv_png(tmp_path):
    from benchmarks import benchmark_scaling

    rows = benchmark_scaling.main(["--quick", "--out", str(tmp_path)])
    assert [r["part"] for r in rows] == ["train step", "sampling (K=1)", "sampling SAD T=2"]
    assert all(r["plain_ms"] > 0 and r["fast_ms"] > 0 for r in rows)
    assert rows[2]["fast_vs_first"].endswith("vs K=1")
    with (tmp_path / "rows.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 3
    assert "| train step" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    from dream_fast.config import PRESETS

    assert not [n for n in PRESETS if n.startswith("_scaling_")], "resized presets must not outlive the run"


def test_bad_sizes_are_named():
    from benchmarks import benchmark_scaling

    with pytest.raises(ValueError, match="square"):
        benchmark_scaling.variant("tiny", 96, quick=False)  # raises before registering anything
    with pytest.raises(SystemExit, match="--ks"):
        benchmark_scaling.main(["--ks", "0"])
