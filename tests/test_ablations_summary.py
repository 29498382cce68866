"""The ablation benchmark's statistics (benchmarks/ablations.py, issue 17) against a hand-worked case."""

import math

import pytest

from tests.benchmark_modules import load_benchmark


def test_summary_pairs_rows_with_the_default_by_distill_seed():
    bench = load_benchmark("ablations")
    other = "teacher: anchor only"

    def run(row, seed, scores):
        return {
            "row": row,
            "distill_seed": seed,
            "scores": scores,
            "distill_seconds": 10.0,
            "student_seconds": 5.0,
        }

    runs = [
        run(bench.DEFAULT_ROW, 0, [10.0, 12.0]),
        run(bench.DEFAULT_ROW, 1, [14.0, 16.0]),
        run(other, 0, [9.0, 9.0]),
        run(other, 1, [16.0, 18.0]),
        run(other, 2, [50.0, 50.0]),
    ]  # fmt: skip  (seed 2 has no default run: not in the paired difference)
    rows = bench.summarise(runs)
    default, anchor = rows[bench.DEFAULT_ROW], rows[other]
    assert default["mean"] == pytest.approx(13.0)
    # sample std of 10, 12, 14, 16: sqrt(((-3)^2 + (-1)^2 + 1 + 9) / 3)
    assert default["std"] == pytest.approx(math.sqrt(20 / 3))
    assert default["std_of_distill_seed_means"] == pytest.approx(
        math.sqrt(((11 - 13) ** 2 + (15 - 13) ** 2) / 1)
    )
    # per-seed differences: 9 - 11 = -2, 17 - 15 = +2 -> mean 0, sd 2 * sqrt(2), SE sd / sqrt(2) = 2
    assert anchor["delta_vs_default"] == pytest.approx(0.0)
    assert anchor["delta_se"] == pytest.approx(2.0)
    assert anchor["runs"] == 6 and anchor["distill_seeds"] == [0, 1, 2]
    assert "delta_vs_default" not in default and default["seconds_per_distill_seed"] == pytest.approx(15.0)
    assert list(rows) == [n for n in bench.ROWS if n in rows]  # the table keeps the ROWS order
