"""The real model and text the demo, the benchmarks and the end-to-end tests use, loaded offline from the PyPI
packages that ship them (nothing downloads at run time). Not imported by ``import sparse_adapt``:
``sparse_adapt.assets.models.load_smollm2()``, ``sparse_adapt.assets.text.wiki_split(...)``."""

from . import models, text

__all__ = ["models", "text"]
