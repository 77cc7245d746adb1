"""Exact memory accounting: the bytes autograd saves for backward."""

from typing import Dict, Iterable

import torch


class SavedBytes:
    """Within ``with SavedBytes(persistent) as saved:``, counts exactly the bytes of the tensors autograd saves for
    backward, each distinct storage once, leaving out the storages of ``persistent`` (a model's parameters and
    buffers, a layer's weight and adapters: memory that exists with or without a backward pass). What remains is
    the activation memory a method costs.

    Storages are told apart by their identity, not their address, so this also counts a model on the meta device
    (where every address is 0): the bytes a full-size model would save, computed without allocating them. A saved
    tensor keeps its storage alive until the count is read, so no identity is reused in between."""

    def __init__(self, persistent: Iterable[torch.Tensor] = ()):
        self.persistent = {self._key(t) for t in persistent}
        self.storages: Dict[int, int] = {}

    @staticmethod
    def _key(t: torch.Tensor) -> int:
        return t.untyped_storage()._cdata

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = self._key(t)
        if key not in self.persistent:
            self.storages[key] = t.untyped_storage().nbytes()
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
