"""`--eval-mode score`: rank a task's labels by likelihood instead of generating.

For each test input the prediction is the label whose tokens (answer + EOS, exactly what
training teaches) have the highest summed log-probability after the prompt. The prompt is run
once per example; its key/value cache (decoder-only) or encoder states (encoder-decoder) are
shared by all the labels, which are scored together in one batched pass.

How it differs from generation-based exact match: a prediction is always one of the labels, so
the invalid-output rate is 0 by construction and a model that lost the answer format can still
score well; it measures what the model prefers among the options, not what it would say.
Summed (not length-normalised) log-probabilities favour shorter labels slightly, the same way
greedy decoding does. Generation stays the default, as in every published table.
"""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..data.types import Task
from ..faults import fault_point
from ..prompts import PromptEncoder
from ..models import unwrap
from .generate import _left_pad, _right_pad, evaluation_mode


def _causal_scores(model, ids, mask, labels, label_mask) -> torch.Tensor:
    """[B, L] summed log-probabilities of each label after each (left-padded) prompt."""
    n_labels = labels.shape[0]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)[:, labels[:, 0]]  # [B, L]
    cache = out.past_key_values
    cache.batch_repeat_interleave(n_labels)
    batch = ids.shape[0]
    label_ids = labels.repeat(batch, 1)  # [B*L, m], row b*L + j is label j after prompt b
    label_mask_rows = label_mask.repeat(batch, 1)
    full_mask = torch.cat([mask.repeat_interleave(n_labels, dim=0), label_mask_rows], dim=1)
    start = positions[:, -1:].repeat_interleave(n_labels, dim=0) + 1
    label_positions = start + torch.arange(labels.shape[1]).unsqueeze(0)
    rest = model(input_ids=label_ids, attention_mask=full_mask, position_ids=label_positions,
                 past_key_values=cache, use_cache=False).logits.float()
    logp = torch.log_softmax(rest[:, :-1], dim=-1).gather(-1, label_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    logp = (logp * label_mask_rows[:, 1:]).sum(-1).view(batch, n_labels)
    return first + logp


def _seq2seq_scores(model, ids, mask, labels, label_mask) -> torch.Tensor:
    n_labels, batch = labels.shape[0], ids.shape[0]
    base = unwrap(model)
    encoded = base.get_encoder()(input_ids=ids, attention_mask=mask)
    hidden = encoded.last_hidden_state.repeat_interleave(n_labels, dim=0)
    targets = labels.repeat(batch, 1).masked_fill(label_mask.repeat(batch, 1) == 0, -100)
    out = base(encoder_outputs=(hidden,), attention_mask=mask.repeat_interleave(n_labels, dim=0), labels=targets,
               use_cache=False)
    logp = torch.log_softmax(out.logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (targets != -100)).sum(-1).view(batch, n_labels)


@evaluation_mode
def label_scores(
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
    synced: bool = False,  # a sharded model (FSDP): see evaluation_mode
) -> torch.Tensor:
    """[sentences, labels] summed log-probabilities of each label's answer + EOS, input order."""
    was_training = model.training
    model.eval()
    prompts = [encoder.prompt_ids(task, s) for s in sentences]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    labels, label_mask = _right_pad([encoder.label_ids(l) + [encoder.eos_id] for l in task.labels], encoder.pad_id)
    labels, label_mask = labels.to(device), label_mask.to(device)
    result = torch.zeros(len(prompts), len(task.labels))
    bar = tqdm(total=len(prompts), desc=f"score {task.name}", disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        pad = _left_pad if arch == "causal" else _right_pad
        ids, mask = pad([prompts[i] for i in chunk], encoder.pad_id)
        with autocast():
            scorer = _causal_scores if arch == "causal" else _seq2seq_scores
            result[chunk] = scorer(model, ids.to(device), mask.to(device), labels, label_mask).float().cpu()
        bar.update(len(chunk))
        fault_point("eval-batch")
    bar.close()
    if was_training:
        model.train()
    return result


def score_answers(model: torch.nn.Module, encoder: PromptEncoder, task: Task, sentences: list[str], **kwargs
                  ) -> tuple[list[str], float]:
    """The most likely label for each sentence, in input order, and the seconds it took
    (the same signature as `generate_answers`)."""
    started = time.perf_counter()
    scores = label_scores(model, encoder, task, sentences, **kwargs)
    answers = [task.labels[best] for best in scores.argmax(dim=-1).tolist()]
    return answers, time.perf_counter() - started
