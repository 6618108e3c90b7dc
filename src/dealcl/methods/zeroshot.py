"""Zero-shot: the untouched base model, the per-task reference b_j of forward transfer."""
from __future__ import annotations

from .base import ContinualMethod, register


@register
class ZeroShot(ContinualMethod):
    name = "zero-shot"
    description = "trains nothing: the base model's own accuracy on each task (reference for FWT)"
    paper = "reference point (no training)"
    trains = False
    export_refusal = "it trains nothing: the base model is the final model"
