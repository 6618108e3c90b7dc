"""Examples → token ids: the upstream prompt with sentence-only truncation, and the answer.

Decoder-only: the sequence is prompt + answer + EOS and the loss covers answer + EOS only
(never the prompt; upstream LLaMA code trained on the prompt too, deal_spec.md §2.3).
Encoder-decoder: the prompt is the source, answer + EOS the target.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..data.types import Task
from .template import chat_wrap, fit_prompt


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
