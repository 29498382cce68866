"""Train students on a distilled set (or on K real pairs, or on the full train split) and report retrieval.

    python recipes/evaluate_student.py --config recipes/configs/evaluate_tiny.yaml \
        --model_name_or_path <teacher> --dataset_name <dataset> --synthetic <synthetic set dir or Hub id>
    python recipes/evaluate_student.py ... --methods synthetic random herding kcenter full   # one comparison table

Thin wrapper: the YAML + CLI become a ``StudentConfig`` and ``mdm_hf.students`` does the rest (selection on the
validation split, one test evaluation per student, mean ± std over seeds, JSON + markdown in ``output_dir``).
"""

import sys

from mdm_hf.cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main(sys.argv[1:]))
