"""mdm-hf: Multimodal Distribution Matching for vision-language dataset distillation on the Hugging Face Hub."""

__version__ = "0.1.0"
