"""Models: short names (registry.py), loading any source (loading.py), tiny test models (tiny.py)."""
from __future__ import annotations


def unwrap(model):
    """The transformers model under a PEFT wrapper (adapters stay injected in its layers)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# A model whose states at a prompt position depend on the whole prompt of its row (GainLoRA's
# gates pool every prompt token's embedding) sets this attribute to False: its prompt prefix is
# then never computed once for all rows, in training (train/services.py) or in evaluation
# (eval/generate.py). The PEFT wrapper forwards the attribute lookup to the transformers model.
SHARES_PROMPT_PREFIX = "dealcl_shares_prompt_prefix"


def shares_prompt_prefix(model) -> bool:
    """Whether a prompt prefix common to all rows may be computed once and its cache reused."""
    return bool(getattr(model, SHARES_PROMPT_PREFIX, True))
