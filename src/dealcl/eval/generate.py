"""Batched greedy generation: the answers exact match is computed on.

Prompts are sorted by length so a batch pads little; decoder-only batches are left-padded and
the attention mask is always passed (upstream put it in the GenerationConfig, where `generate`
never reads it, so pad tokens were attended: deal_spec.md §2.4).

Exact match is upstream's: greedy generation of up to 50 new tokens (`generation_max_length`),
normalised, compared with the label. Generating all 50 tokens for every answer is wasted work
once the answer can no longer become a label, so a row also stops as soon as its normalised
text so far is not a prefix of any normalised label (`LabelPrefixStop`). That changes no exact
match and no invalid-output decision (docs/METHODS.md, "Exact match" has the proof sketch): the
normalised final text always begins with the normalised text so far, so a row that is not a
label prefix now can never equal a label later. Only the stored text of such an invalid answer
is shorter. ROUGE scores the whole answer, so `with_rouge` generates without the early stop.
"""
from __future__ import annotations

import copy
import functools
import time

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from ..data.types import Task
from ..faults import fault_point
from ..models import shares_prompt_prefix
from ..prompts import PromptEncoder, common_prefix_length
from .metrics import normalize_answer

# Upstream's `generation_max_length` (deal_spec.md §2.4, gorp_olora_spec.md §1.2), used as
# max_new_tokens by every released script.
MAX_NEW_TOKENS = 50
# Recorded in run.yaml and in stage-0 keys: answers made under another rule are not comparable.
ANSWER_RULE = f"greedy, {MAX_NEW_TOKENS} new tokens, stop at EOS or when no label can still match"


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def _right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def can_still_match(text: str, normalized_labels: list[str]) -> bool:
    """Whether some continuation of `text` could still normalise to one of the labels.

    The normalised form of text + continuation always starts with the normalised form of
    text (normalising is character-wise except for whitespace runs, which only ever join onto
    the last word), so a text whose normalised form is no label's prefix is invalid whatever
    follows. A byte-level decoder shows an incomplete UTF-8 character as U+FFFD until its last
    byte arrives: trailing replacement characters are not yet text, so they are ignored here."""
    normalized = normalize_answer(text.rstrip("\ufffd"))
    return any(label.startswith(normalized) for label in normalized_labels)


class LabelPrefixStop(StoppingCriteria):
    """Marks a row done once its generated text can no longer become a label (see above).

    `start` is the column where the generated tokens begin in the ids `generate` passes (the
    prompt width for decoder-only models, 0 for encoder-decoder decoder ids)."""

    def __init__(self, tokenizer, labels: list[str], start: int) -> None:
        self.tokenizer = tokenizer
        self.labels = sorted({normalize_answer(label) for label in labels})
        self.start = start

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :].tolist(), skip_special_tokens=True)
        done = [not can_still_match(text, self.labels) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def evaluation_mode(fn):
    """Run `fn` under inference mode, or under no_grad when called with synced=True: FSDP
    allocates its all-gather buffers in the first forward and reuses them later, which
    inference tensors forbid outside inference mode."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.no_grad() if kwargs.get("synced") else torch.inference_mode():
            return fn(*args, **kwargs)
    return wrapper


@evaluation_mode
def generate_answers(
    model: torch.nn.Module,
    encoder: PromptEncoder,
    task: Task,
    sentences: list[str],
    *,
    arch: str,
    batch_size: int,
    device: torch.device,
    autocast,
    progress: bool = True,
    share_prefix: bool = True,
    synced: bool = False,
    stop_without_label: bool = True,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> tuple[list[str], float]:
    """Greedy answers for `sentences`, in input order, and the seconds it took.

    Decoder-only prompts of one task begin with the same tokens (task, dataset, instruction,
    options): with `share_prefix` that common prefix is computed once, and every batch starts
    from a copy of its key/value cache. `synced` is for a model sharded over ranks (FSDP), whose
    every forward is a collective: each rank must pass the same number of sentences, and a rank
    whose batch has finished keeps stepping until all have (transformers' `synced_gpus`).
    `stop_without_label` stops a row once no label can match any more (exact-match decisions
    unchanged); off, every row runs to EOS or `max_new_tokens` (for ROUGE)."""
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    prompts = [encoder.prompt_ids(task, s) for s in sentences]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    tokenizer = encoder.tokenizer
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=encoder.eos_id,
        pad_token_id=encoder.pad_id,
        decoder_start_token_id=getattr(getattr(model, "config", None), "decoder_start_token_id", None),
    )
    answers: list[str] = [""] * len(prompts)
    # Ranks' prefixes may differ in length, not in number of forwards: only safe unsynced; and
    # never for a model whose prefix states depend on the rest of the row (GainLoRA's gates).
    shared = share_prefix and arch == "causal" and not synced and shares_prompt_prefix(model)
    prefix = prompts[0][: common_prefix_length(prompts)] if shared else []
    prefix_cache = None
    if prefix:
        with autocast():
            prefix_output = model(input_ids=torch.tensor([prefix], device=device), use_cache=True)
        # transformers renamed `past_key_values` to `cache` (outputs and generate) during 5.x.
        cache_key = "cache" if "cache" in prefix_output else "past_key_values"
        prefix_cache = prefix_output[cache_key]
    bar = tqdm(total=len(prompts), desc=f"eval {task.name}", disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        rows = [prompts[i] for i in chunk]
        pad = _left_pad if arch == "causal" else _right_pad
        extra = {}
        if prefix_cache is not None:
            # [prefix | left-padded suffix]: the mask hides the pads, positions follow the mask.
            suffix_ids, suffix_mask = pad([r[len(prefix):] for r in rows], encoder.pad_id)
            input_ids = torch.cat([torch.tensor([prefix]).expand(len(rows), -1), suffix_ids], dim=1)
            attention_mask = torch.cat([torch.ones(len(rows), len(prefix), dtype=torch.long), suffix_mask], dim=1)
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(rows))
            extra[cache_key] = cache
        else:
            input_ids, attention_mask = pad(rows, encoder.pad_id)
        if stop_without_label:
            start = input_ids.shape[1] if arch == "causal" else 0
            extra["stopping_criteria"] = StoppingCriteriaList([LabelPrefixStop(tokenizer, task.labels, start)])
        with autocast():
            output = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config,
                **extra, **({"synced_gpus": True} if synced else {}),
            )
        new_tokens = output[:, input_ids.shape[1] :] if arch == "causal" else output
        texts = tokenizer.batch_decode(new_tokens.tolist(), skip_special_tokens=True)
        for i, text in zip(chunk, texts):
            answers[i] = text.strip()
        bar.update(len(chunk))
        fault_point("eval-batch")
    bar.close()
    if was_training:
        model.train()
    return answers, time.perf_counter() - started
