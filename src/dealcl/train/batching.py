"""Examples → token ids → padded batches, for both architectures.

Decoder-only: the sequence is prompt + answer + EOS and the loss covers answer + EOS only
(never the prompt; upstream LLaMA code trained on the prompt too, deal_spec.md §2.3). The batch
records where the answer tokens are so that the loss computes logits there and nowhere else.
Encoder-decoder: the prompt is the source, answer + EOS the target.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.types import Task
from ..prompts import chat_wrap, fit_prompt


@dataclass
class EncodedExample:
    prompt_ids: list[int]
    answer_ids: list[int]  # the label's tokens followed by EOS
    index: int = -1  # position in the stage's list of training items (LwF's teacher cache)


class PromptEncoder:
    """Turns (task, sentence, label) into ids, with the upstream prompt and sentence-only truncation."""

    def __init__(self, tokenizer, arch: str, max_source_length: int = 512, prompt_style: str = "plain") -> None:
        self.tokenizer = tokenizer
        self.arch = arch
        self.max_source_length = max_source_length
        self.prompt_style = prompt_style
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._prompt_cache: dict[tuple[str, str], list[int]] = {}

    def prompt_text(self, task: Task, sentence: str) -> str:
        budget = self.max_source_length
        if self.arch == "seq2seq":
            budget -= 1  # room for the EOS the source ends with
        text = fit_prompt(task, sentence, self.tokenizer, budget)
        return chat_wrap(text, self.tokenizer) if self.prompt_style == "chat" else text

    def prompt_ids(self, task: Task, sentence: str) -> list[int]:
        key = (task.name, sentence)
        ids = self._prompt_cache.get(key)
        if ids is None:
            ids = list(self.tokenizer(self.prompt_text(task, sentence), add_special_tokens=True).input_ids)
            if self.arch == "seq2seq" and (not ids or ids[-1] != self.eos_id):
                ids.append(self.eos_id)
            self._prompt_cache[key] = ids
        return ids

    def label_ids(self, label: str) -> list[int]:
        # Decoder-only: the answer follows "Answer:" after a space, the way BPE tokenizers split
        # words (" World" is one token); exact match strips the space again.
        text = f" {label}" if self.arch == "causal" else label
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def encode(self, task: Task, sentence: str, label: str, index: int = -1) -> EncodedExample:
        return EncodedExample(self.prompt_ids(task, sentence), self.label_ids(label) + [self.eos_id], index)


MIN_SHARED_PREFIX = 8  # tokens; below this a shared prefix saves less than it costs


def common_prefix_length(prompts: list[list[int]]) -> int:
    """How many leading tokens every prompt shares, leaving each at least one token of its own
    (the last prompt token predicts the answer); 0 below MIN_SHARED_PREFIX or for one prompt.
    Every prompt of a task starts with the same task, dataset, instruction and options."""
    if len(prompts) < 2:
        return 0
    limit = min(len(p) for p in prompts) - 1
    first = prompts[0]
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n if n >= MIN_SHARED_PREFIX else 0


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
