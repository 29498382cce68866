"""Typed results of student evaluation (docs/method.md §5) and the one results table.

* :class:`StudentRecord` -- one student: the step selected on validation, its validation and (once) test metrics;
* :class:`ResultRow` -- one method: mean and sample std of the test metrics over its seeds, with their records;
* :class:`StudentResult` -- one method evaluated alone (:func:`~mdm_hf.students.evaluate_student`);
* :class:`Comparison` -- every method under one protocol (:func:`~mdm_hf.students.compare_methods`).

``to_dict()`` gives the JSON written to disk (the keys of ``student_<method>.json`` / ``comparison.json`` and of a
:class:`~mdm_hf.synthetic.SyntheticSet` card's ``results``); ``from_dict()`` reads it back, including files recorded
when the distilled set's method was still called ``"mdm"``. :func:`format_results_table` is the one markdown
renderer of these rows (terminal, ``*.md`` files, dataset cards).

This module imports nothing heavier than the standard library, so a dataset card can use it cheaply.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cards import results_table
from ..retrieval import METRIC_NAMES
from .config import METHOD_ALIASES

__all__ = [
    "METHOD_LABELS",
    "METRIC_NAMES",
    "Comparison",
    "ResultRow",
    "StudentRecord",
    "StudentResult",
    "card_results",
    "format_results_table",
    "method_label",
    "save_results",
]

METHOD_LABELS = {
    "synthetic": "Synthetic set",
    "random": "Random",
    "herding": "Herding",
    "kcenter": "K-Center",
    "kmeans": "K-Means (joint)",
    "full": "Full train set",
}
# Table label -> method, to read rows back; "MDM" is the label every recorded "mdm" row carries.
_METHOD_OF_LABEL = {**{label: method for method, label in METHOD_LABELS.items()}, "MDM": "synthetic"}


def method_label(method: str, synthetic=None) -> str:
    """The label of ``method`` in tables: for ``"synthetic"``, the distiller the set's provenance names (e.g.
    ``"MDM"``), else :data:`METHOD_LABELS`."""
    if method == "synthetic" and synthetic is not None:
        name = (getattr(synthetic, "provenance", None) or {}).get("method")
        if name:
            return str(name)
    return METHOD_LABELS[method]


def _method_name(method: str) -> str:
    """A method as recorded on disk -> its current name (files written before the rename say ``"mdm"``)."""
    return METHOD_ALIASES.get(method, method)


class _DictAccess:
    """Deprecated ``result["key"]`` reading of a typed result (code written when these were plain dicts)."""

    def to_dict(self) -> dict:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        warnings.warn(
            f"{type(self).__name__}[{key!r}] is deprecated: results are typed; use the attribute or .to_dict().",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.to_dict()[key]

    def __contains__(self, key: str) -> bool:
        return key in self.to_dict()

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default


@dataclass
class StudentRecord(_DictAccess):
    """One trained student: selected at ``best_step`` on validation, then scored once on test (metrics in %)."""

    method: str
    seed: int
    pairs: int
    best_step: int
    steps: int
    train_seconds: float
    validation: dict[str, float]
    test: dict[str, float]
    validation_history: list[dict] = field(default_factory=list)
    train_loss: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> StudentRecord:
        return cls(**{**values, "method": _method_name(values["method"])})


@dataclass
class ResultRow:
    """One method's row: per-metric mean and sample std (0 for one seed) of the test metrics over its seeds.

    ``method`` is the method's name (``"synthetic"``, ``"random"``, ...), ``label`` what tables show.
    """

    method: str
    label: str
    pairs: int | None
    means: dict[str, float]
    stds: dict[str, float] = field(default_factory=dict)
    seeds: int | None = None
    records: list[StudentRecord] = field(default_factory=list)

    @classmethod
    def from_records(
        cls,
        method: str,
        records: Sequence[StudentRecord],
        label: str | None = None,
        metric_names: Sequence[str] = METRIC_NAMES,
    ) -> ResultRow:
        means, stds = {}, {}
        for m in metric_names:
            values = [r.test[m] for r in records]
            means[m] = statistics.fmean(values)
            stds[m] = statistics.stdev(values) if len(values) > 1 else 0.0
        label = label or METHOD_LABELS[method]
        return cls(method, label, records[0].pairs, means, stds, len(records), list(records))

    def to_dict(self) -> dict:
        """The card's row: ``{"method": label, "pairs", "ir@1", "ir@1_std", ..., "mean", "mean_std", "seeds"}``."""
        row: dict[str, Any] = {"method": self.label, "pairs": self.pairs}
        for m, value in self.means.items():
            row[m] = value
            if m in self.stds:
                row[f"{m}_std"] = self.stds[m]
        if self.seeds is not None:
            row["seeds"] = self.seeds
        return row

    @classmethod
    def from_dict(
        cls, row: Mapping[str, Any], method: str | None = None, records: Sequence = ()
    ) -> ResultRow:
        """A row dict (and its per-seed records, dicts or :class:`StudentRecord`) -> a :class:`ResultRow`."""
        label = str(row["method"])
        means = {
            k: v for k, v in row.items() if k not in ("method", "pairs", "seeds") and not k.endswith("_std")
        }
        stds = {k[: -len("_std")]: v for k, v in row.items() if k.endswith("_std")}
        records = [r if isinstance(r, StudentRecord) else StudentRecord.from_dict(r) for r in records]
        name = _method_name(method) if method else _METHOD_OF_LABEL.get(label, label)
        return cls(name, label, row.get("pairs"), means, stds, row.get("seeds"), records)


@dataclass
class StudentResult(_DictAccess):
    """One method evaluated alone: its row, the protocol sentence, the config and the environment."""

    row: ResultRow
    protocol: str
    config: dict | None = None
    environment: dict | None = None

    @property
    def method(self) -> str:
        return self.row.method

    @property
    def runs(self) -> list[StudentRecord]:
        return self.row.records

    @property
    def rows(self) -> list[ResultRow]:
        return [self.row]

    @property
    def metric_names(self) -> list[str]:
        return list(self.row.means)

    def to_dict(self) -> dict:
        """``{"method", "row", "protocol", "runs", "config", "environment"}`` (``student_<method>.json``)."""
        return {
            "method": self.method,
            "row": self.row.to_dict(),
            "protocol": self.protocol,
            "runs": [r.to_dict() for r in self.runs],
            "config": self.config,
            "environment": self.environment,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> StudentResult:
        row = ResultRow.from_dict(values["row"], values.get("method"), values.get("runs") or ())
        return cls(row, values["protocol"], values.get("config"), values.get("environment"))

    def card_results(self) -> dict:
        return {"protocol": self.protocol, "metric_names": self.metric_names, "rows": [self.row.to_dict()]}


@dataclass
class Comparison(_DictAccess):
    """Every method under the SAME student protocol and seeds: the results a SyntheticSet card shows."""

    rows: list[ResultRow]
    protocol: str
    notes: str | None = None
    metric_names: list[str] = field(default_factory=lambda: list(METRIC_NAMES))
    config: dict | None = None
    environment: dict | None = None

    @property
    def runs(self) -> dict[str, list[StudentRecord]]:
        """Per-seed records by method."""
        return {row.method: row.records for row in self.rows}

    @property
    def full_row(self) -> ResultRow | None:
        """The full-train-split row (the reference every budget is compared with), if it was run."""
        return next((row for row in self.rows if row.method == "full"), None)

    def row(self, method: str) -> ResultRow:
        """The row of ``method`` (``"mdm"`` is read as ``"synthetic"``)."""
        name = _method_name(method)
        for row in self.rows:
            if row.method == name:
                return row
        raise KeyError(f"No {method!r} row; methods: {[row.method for row in self.rows]}.")

    def to_dict(self) -> dict:
        """``{"protocol", "metric_names", "rows", "notes", "runs"[, "config", "environment"]}``
        (``comparison.json``)."""
        out = {
            "protocol": self.protocol,
            "metric_names": list(self.metric_names),
            "rows": [row.to_dict() for row in self.rows],
            "notes": self.notes,
            "runs": {row.method: [r.to_dict() for r in row.records] for row in self.rows},
        }
        if self.config is not None:
            out["config"] = self.config
        if self.environment is not None:
            out["environment"] = self.environment
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Comparison:
        """Read ``to_dict()``'s output, a saved ``comparison.json`` or a card's ``results`` (no ``runs``)."""
        runs = dict(values.get("runs") or {})
        rows = values.get("rows") or []
        # runs are keyed by method in row order; without them (a card), the label names the method
        methods = list(runs) if len(runs) == len(rows) else [None] * len(rows)
        typed = [ResultRow.from_dict(r, m, runs.get(m) or ()) for r, m in zip(rows, methods)]
        names = values.get("metric_names") or list(METRIC_NAMES)
        return cls(typed, values.get("protocol") or "", values.get("notes"), list(names),
                   values.get("config"), values.get("environment"))  # fmt: skip

    def card_results(self) -> dict:
        return {k: v for k, v in self.to_dict().items() if k in ("protocol", "metric_names", "rows", "notes")}


def card_results(results: Comparison | StudentResult | Mapping[str, Any]) -> dict:
    """What a SyntheticSet card keeps of a result (JSON: per-seed runs, config and environment dropped)."""
    if isinstance(results, (Comparison, StudentResult)):
        return results.card_results()
    return {k: results[k] for k in ("protocol", "metric_names", "rows", "notes") if k in results}


def _rows_and_names(results) -> tuple[list, Sequence[str] | None]:
    if isinstance(results, (Comparison, StudentResult)):
        return list(results.rows), results.metric_names
    if isinstance(results, Mapping):
        return list(results.get("rows") or []), results.get("metric_names")
    return list(results), None


def format_results_table(
    results: Comparison | StudentResult | Mapping[str, Any] | Sequence[ResultRow | Mapping[str, Any]],
    metric_names: Sequence[str] | None = None,
) -> str:
    """The one markdown results table: a row per method, ``mean ± std`` per metric (``.2f``, recall in %).

    Args:
        results: a :class:`Comparison` or :class:`StudentResult`, a mapping with ``"rows"`` (and optionally
            ``"metric_names"``: a saved ``comparison.json``, a SyntheticSet's ``results``) or a sequence of rows
            (:class:`ResultRow` or row dicts).
        metric_names: the metric columns (default: the results' own, else :data:`METRIC_NAMES`); ``"mean"`` is
            always the last metric column. A missing value shows as ``–``, a row without ``pairs`` as ``all``.
    """
    rows, names = _rows_and_names(results)
    rows = [row.to_dict() if isinstance(row, ResultRow) else row for row in rows]
    return results_table(rows, metric_names or names or METRIC_NAMES)


def save_results(result: Comparison | StudentResult, output_dir: str | os.PathLike | None, name: str) -> None:
    """Write ``<name>.json`` (``result.to_dict()``) and ``<name>.md`` (its table) to ``output_dir`` (None: skip)."""
    if not output_dir:
        return
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    (out / f"{name}.md").write_text(format_results_table(result) + "\n")
