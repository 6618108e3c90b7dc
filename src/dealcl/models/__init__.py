"""Models: short names (registry.py), loading any source (loading.py), tiny test models (tiny.py)."""
from __future__ import annotations


def unwrap(model):
    """The transformers model under a PEFT wrapper (adapters stay injected in its layers)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
