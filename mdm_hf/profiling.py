"""Measuring what a distillation step keeps in memory, independently of the machine's load (benchmarks, tests)."""

from __future__ import annotations

import weakref

import torch


class SavedTensorsMeter:
    """Peak and live bytes of the tensors autograd saves for backward (the activation memory), via
    ``torch.autograd.graph.saved_tensors_hooks``. Use as a context manager around forward (+ backward)."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def __enter__(self) -> SavedTensorsMeter:
        class Box:  # weak-referenceable holder: its finalizer fires when autograd drops the saved tensor
            def __init__(self, tensor: torch.Tensor) -> None:
                self.tensor = tensor

        def pack(tensor: torch.Tensor) -> Box:
            box, size = Box(tensor), tensor.numel() * tensor.element_size()
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(box, self._release, size)
            return box

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor)
        self._hooks.__enter__()
        return self

    def _release(self, size: int) -> None:
        self.live -= size

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
