"""``mdm-hf evaluate`` / ``recipes/evaluate_student.py``: parse a :class:`StudentConfig`, run, print the table."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..config import parse_dataclass_args
from .config import StudentConfig
from .evaluator import compare_methods, evaluate_student
from .results import format_results_table

__all__ = ["evaluate_main"]


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """One method (``--method``), or ``--methods ...`` compared under one protocol; prints the results table."""
    config = parse_dataclass_args(StudentConfig, argv, prog="mdm-hf evaluate")
    result = compare_methods(config) if config.methods else evaluate_student(config)
    print(format_results_table(result))
    print(f"\nProtocol: {result.protocol}")
    if config.output_dir:
        print(f"Results written to {os.path.abspath(config.output_dir)}")
    return 0
