"""Encoded examples → padded training batches, for both architectures.

Decoder-only: the sequence is prompt + answer + EOS and the loss covers answer + EOS only
(never the prompt; upstream LLaMA code trained on the prompt too, deal_spec.md §2.3). The batch
records where the answer tokens are so that the loss computes logits there and nowhere else.
Encoder-decoder: the prompt is the source, answer + EOS the target.
"""
from __future__ import annotations

import torch

from ..prompts import EncodedExample, common_prefix_length


def collate_train(examples: list[EncodedExample], arch: str, pad_id: int) -> dict:
    """Pad a micro-batch to its own longest sequence (dynamic padding). Decoder-only batches
    also say how many leading tokens all their prompts share (`prefix_len`)."""
    if arch == "causal":
        sequences = [e.prompt_ids + e.answer_ids for e in examples]
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        rows, positions, targets = [], [], []
        for row, (example, sequence) in enumerate(zip(examples, sequences)):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            attention_mask[row, : len(sequence)] = 1
            start = len(example.prompt_ids)
            for offset, token in enumerate(example.answer_ids):
                rows.append(row)
                positions.append(start + offset - 1)  # the position whose logits predict `token`
                targets.append(token)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "target_rows": torch.tensor(rows),
            "target_positions": torch.tensor(positions),
            "target_ids": torch.tensor(targets),
            "indices": [e.index for e in examples],
            "prefix_len": common_prefix_length([e.prompt_ids for e in examples]),
        }
    width = max(len(e.prompt_ids) for e in examples)
    target_width = max(len(e.answer_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), target_width), -100, dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, : len(example.prompt_ids)] = torch.tensor(example.prompt_ids)
        attention_mask[row, : len(example.prompt_ids)] = 1
        labels[row, : len(example.answer_ids)] = torch.tensor(example.answer_ids)
    mask = labels != -100
    rows, positions = mask.nonzero(as_tuple=True)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "target_rows": rows,
        "target_positions": positions,
        "target_ids": labels[mask],
        "indices": [e.index for e in examples],
    }


def num_targets(batch: dict) -> int:
    return int(batch["target_ids"].numel())
