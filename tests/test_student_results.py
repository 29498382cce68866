"""Typed student results (mdm_hf.students.results): JSON round trips, files recorded before the 'synthetic' rename,
the one results table, and a cheap import for dataset cards."""

from __future__ import annotations

import json

import pytest

from mdm_hf.students.results import (
    METRIC_NAMES,
    Comparison,
    ResultRow,
    StudentRecord,
    StudentResult,
    card_results,
    format_results_table,
    method_label,
    save_results,
)


def record(method: str, seed: int, mean: float) -> StudentRecord:
    test = {m: mean + i for i, m in enumerate(METRIC_NAMES)}
    return StudentRecord(
        method=method, seed=seed, pairs=8, best_step=2, steps=4, train_seconds=0.5,
        validation={m: 1.0 for m in METRIC_NAMES}, test=test,
        validation_history=[{"step": 0, "mean": 0.5}, {"step": 2, "mean": 1.0}],
        train_loss=[{"step": 1, "loss": 2.0, "learning_rate": 1e-3}],
    )  # fmt: skip


def comparison() -> Comparison:
    rows = [
        ResultRow.from_records(
            "synthetic", [record("synthetic", 0, 7.0), record("synthetic", 1, 9.0)], "MDM"
        ),
        ResultRow.from_records("random", [record("random", 0, 5.0), record("random", 1, 5.0)]),
        ResultRow.from_records("full", [record("full", 0, 20.0), record("full", 1, 22.0)]),
    ]
    return Comparison(rows, "p", "n", list(METRIC_NAMES), {"seed": 0}, {"torch": "x"})


def test_rows_are_mean_and_sample_std_over_seeds():
    row = comparison().row("synthetic")
    assert row.means["mean"] == 8.0 + 6 and row.stds["mean"] == pytest.approx(2**0.5)
    assert (row.method, row.label, row.pairs, row.seeds, len(row.records)) == ("synthetic", "MDM", 8, 2, 2)
    one = ResultRow.from_records("kcenter", [record("kcenter", 0, 3.0)])
    assert one.stds["ir@1"] == 0.0 and one.label == "K-Center"


def test_to_dict_round_trips_and_keeps_the_recorded_keys(tmp_path):
    result = comparison()
    data = result.to_dict()
    assert list(data) == ["protocol", "metric_names", "rows", "notes", "runs", "config", "environment"]
    assert list(data["rows"][0]) == [
        "method", "pairs", "ir@1", "ir@1_std", "ir@5", "ir@5_std", "ir@10", "ir@10_std", "tr@1", "tr@1_std",
        "tr@5", "tr@5_std", "tr@10", "tr@10_std", "mean", "mean_std", "seeds",
    ]  # fmt: skip
    assert list(data["runs"]) == ["synthetic", "random", "full"]
    assert list(data["runs"]["random"][0]) == [
        "method", "seed", "pairs", "best_step", "steps", "train_seconds", "validation", "test",
        "validation_history", "train_loss",
    ]  # fmt: skip
    back = Comparison.from_dict(json.loads(json.dumps(data)))
    assert back == result and back.to_dict() == data
    assert back.full_row.means["mean"] == 21.0 + 6 and back.runs["random"][1].seed == 1

    single = StudentResult(result.rows[1], "p", {"seed": 0}, {"torch": "x"})
    assert list(single.to_dict()) == ["method", "row", "protocol", "runs", "config", "environment"]
    assert StudentResult.from_dict(json.loads(json.dumps(single.to_dict()))) == single

    save_results(result, tmp_path, "comparison")
    assert json.loads((tmp_path / "comparison.json").read_text()) == data
    assert (tmp_path / "comparison.md").read_text() == format_results_table(result) + "\n"
    save_results(result, None, "nowhere")  # no output_dir: nothing written, no error


def test_files_recorded_with_the_mdm_method_name_are_read_as_synthetic():
    old = comparison().to_dict()
    old["runs"] = {("mdm" if m == "synthetic" else m): [dict(r, method="mdm" if m == "synthetic" else m)
                   for r in runs] for m, runs in old["runs"].items()}  # fmt: skip
    back = Comparison.from_dict(old)
    assert [row.method for row in back.rows] == ["synthetic", "random", "full"]
    assert back.row("mdm") is back.row("synthetic") and back.runs["synthetic"][0].method == "synthetic"
    # a card's results: no runs, the labels name the methods
    card = Comparison.from_dict(card_results(old))
    assert [row.method for row in card.rows] == ["synthetic", "random", "full"] and card.runs["random"] == []
    assert card.card_results() == card_results(old)


def test_deprecated_dict_reading_of_typed_results():
    result = comparison()
    with pytest.warns(DeprecationWarning, match="results are typed"):
        assert result["rows"] == result.to_dict()["rows"]
    with pytest.warns(DeprecationWarning):
        assert result.rows[0].records[0]["test"]["mean"] == 13.0
    assert "protocol" in result and result.get("missing", 3) == 3


def test_the_one_table_renders_typed_rows_dicts_and_card_results_alike():
    result = comparison()
    table = format_results_table(result)
    lines = table.splitlines()
    assert lines[0] == "| Method | Pairs | IR@1 | IR@5 | IR@10 | TR@1 | TR@5 | TR@10 | Mean | Seeds |"
    assert lines[1] == "|" + "---|" * 10
    assert lines[2].startswith("| MDM | 8 | 8.00 ± 1.41 | 9.00 ± 1.41 |") and lines[2].endswith(
        "14.00 ± 1.41 | 2 |"
    )
    assert format_results_table(result.to_dict()) == table == format_results_table(result.rows)
    assert format_results_table(result.card_results()) == table
    # card-style rows: metrics without "mean" in metric_names, missing stds and metrics, pairs None, a "|"
    card = {
        "metric_names": ["ir@1", "tr@1"],
        "rows": [
            {
                "method": "MDM",
                "pairs": 5,
                "ir@1": 8.1,
                "ir@1_std": 0.4,
                "mean": 26.4,
                "mean_std": 0.3,
                "seeds": 5,
            },
            {"method": "a|b", "pairs": None, "ir@1": 40.0, "mean": 55.7},
        ],
    }
    lines = format_results_table(card).splitlines()
    assert lines[0] == "| Method | Pairs | IR@1 | TR@1 | Mean | Seeds |"
    assert lines[2] == "| MDM | 5 | 8.10 ± 0.40 | – | 26.40 ± 0.30 | 5 |"
    assert lines[3] == "| a\\|b | all | 40.00 | – | 55.70 | – |"


def test_labels_name_the_distiller_of_a_synthetic_set():
    class Set:
        provenance = {"method": "MDM"}

    assert method_label("synthetic", Set()) == "MDM"
    assert method_label("synthetic") == "Synthetic set" and method_label("kcenter") == "K-Center"
    Set.provenance = {}
    assert method_label("synthetic", Set()) == "Synthetic set"
