"""Exact memory accounting: the bytes autograd saves for backward."""

from typing import Dict, Iterable

import torch


class SavedBytes:
    """Within ``with SavedBytes(persistent) as saved:``, counts exactly the bytes of the tensors autograd saves for
    backward, each distinct storage once, leaving out the storages of ``persistent`` (a model's parameters and
    buffers, a layer's weight and adapters: memory that exists with or without a backward pass). What remains is
    the activation memory a method costs."""

    def __init__(self, persistent: Iterable[torch.Tensor] = ()):
        self.persistent = {t.untyped_storage().data_ptr() for t in persistent}
        self.storages: Dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.persistent:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def __enter__(self) -> "SavedBytes":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
