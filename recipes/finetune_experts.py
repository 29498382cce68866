"""Fine-tune the experts of an MDM expert bank (LoRA on the vision tower, projections in full, text tower frozen).

    accelerate launch recipes/finetune_experts.py --config recipes/configs/experts_tiny.yaml [--field value ...]
    mdm-hf experts --config recipes/configs/experts_tiny.yaml [--field value ...]

Thin wrapper: the YAML + CLI become an ``ExpertTrainingConfig`` and the library does the rest (``mdm_hf.experts``).
The bank lands in ``output_dir`` (manifest.json, README.md, expert-<i>/epoch-<e>/ adapters); pass it to the
distiller with ``--expert_bank <output_dir>`` or push it with ``--push_to_hub --hub_model_id user/name``.
"""

import sys

from mdm_hf.cli import experts_main

if __name__ == "__main__":
    sys.exit(experts_main(sys.argv[1:]))
