"""Everything a continual method may use from the engine, in one place.

A method gets one `TrainingServices` (as `self.services`) and needs nothing else from train/:
the prompt encoder, the run's seed and seeded generators, autocast for the run's precision,
the answer-only forward and its loss, batches over items in a fixed order, and the process
group (`processes`: shards, gradient sums, gathers; one process outside torchrun).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..models import shares_prompt_prefix, unwrap  # noqa: F401 (methods read the transformers model under PEFT's wrapper)
from ..prompts import EncodedExample, PromptEncoder
from .batching import collate_train
from .distributed import Processes, single_process
from .hooks import TrainItem


class TrainingServices:
    """What a method may use from the engine (see the module docstring).

    `seed` is the run's seed: a method that draws random numbers outside the loop (a new
    adapter's init, a buffer's sample) takes them from `generator(offset)`, so that a resumed
    run draws exactly what an uninterrupted one did. Inside `train_stage` the global torch RNG
    (dropout) is seeded per stage by the loop."""

    def __init__(self, encoder: PromptEncoder, arch: str, precision: str, device: torch.device,
                 processes: Processes | None = None, share_prefix: bool = True, seed: int = 42) -> None:
        self.encoder = encoder
        self.seed = seed
        self.arch = arch
        self.precision = precision
        self.device = device
        self.processes = processes or single_process()
        # Decoder-only micro-batches compute the prompt prefix they share once (see
        # `answer_logits`). Never with sharded weights: an extra forward on some ranks only
        # would break FSDP's lockstep.
        self.share_prefix = share_prefix and arch == "causal" and not self.processes.sharded
        self._mask_logits: bool | None = None  # whether the model takes a mask as logits_to_keep (probed once)
        self.on_trained = lambda examples: None  # called after every optimizer step (the run's progress)
        # Called after every optimizer step with the stage's step number, the step's loss terms
        # ("task" and each of the method's extra_losses, as added to the loss) and the learning
        # rate: the run's experiment trackers (runs/tracking.py).
        self.on_step = lambda step, loss_terms, lr: None
        # Called with every batch just before `answer_logits` runs the model on it: a method
        # whose forward needs to know where each row's prompt ends (GainLoRA's gate pools the
        # prompt tokens only, never the answer) registers a callable here.
        self.batch_observers: list[Callable[[dict], None]] = []

    def generator(self, offset: int) -> torch.Generator:
        """A CPU generator seeded by the run's seed and `offset` (distinct per use and task)."""
        return torch.Generator().manual_seed(self.seed * 1000 + offset)

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def answer_logits(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """Logits at the answer positions only, shape [answer tokens, vocab], from the model's
        own forward, so that whatever its head does after the projection (Gemma-2's final
        soft-capping, Cohere's logit scale) is what training sees, as generation does.

        For decoder-only models the LM head runs on the answer positions alone
        (`logits_to_keep`): on a 49k vocabulary the head over every prompt position costs as
        much as several layers. And the prompt prefix every row shares (task, dataset,
        instruction, options: about half an agnews prompt) is computed once, as a batch of one,
        and its keys and values are repeated for the rows: the rows' gradients flow back
        through the repeat into that one computation, so the step's loss and gradient are those
        of the unshared batch (LoRA dropout draws one mask for the shared positions)."""
        for observe in self.batch_observers:
            observe(batch)
        rows, positions = batch["target_rows"], batch["target_positions"]
        if self.arch == "causal":
            ids, forward = batch["input_ids"], {}
            shared = self.shared_prefix_len(model, batch)
            cache = prefix_cache(model, ids[:1, :shared], ids.shape[0]) if shared else None
            if cache is not None:
                forward = dict([cache])
                ids, positions = ids[:, shared:], positions - shared
            inputs = (model, ids, batch["attention_mask"], rows, positions)
            if self._mask_logits is None:  # the first call finds out what this model accepts
                try:
                    logits = mask_answer_logits(*inputs, **forward)
                except (TypeError, IndexError, ValueError):
                    logits = None
                self._mask_logits = logits is not None
                if logits is not None:
                    return logits
                if cache is not None:  # the failed probe used the cache up: start again
                    return self.answer_logits(model, batch)
                return union_answer_logits(*inputs)
            return (mask_answer_logits if self._mask_logits else union_answer_logits)(*inputs, **forward)
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"], use_cache=False
        )
        return out.logits[rows, positions]

    def shared_prefix_len(self, model: torch.nn.Module, batch: dict) -> int:
        """Prompt positions `answer_logits` computes once for the whole batch (0: none): only
        decoder-only models share, and not where the model says its rows cannot (gainlora)."""
        if self.arch != "causal" or not self.share_prefix or not shares_prompt_prefix(model):
            return 0
        return batch.get("prefix_len", 0)

    def computed_tokens(self, model: torch.nn.Module, batch: dict) -> int:
        """Token positions the forward computes (FLOP accounting): a shared prefix counts once."""
        ids = batch["input_ids"]
        shared = self.shared_prefix_len(model, batch)
        return ids.numel() - (ids.shape[0] - 1) * shared + batch.get("labels", ids[:, :0]).numel()

    def batches(self, items: list[TrainItem], batch_size: int) -> Iterator[dict]:
        """Batches in item order, for methods that need a pass over data (EWC's Fisher, LwF's
        teacher); a batch's `indices` are positions in `items`, as in the loop's batches."""
        encoded = self.encode_items(items)
        for start in range(0, len(encoded), batch_size):
            yield self.to_device(collate_train(encoded[start : start + batch_size], self.arch, self.encoder.pad_id))

    def encode_items(self, items: list[TrainItem]) -> list[EncodedExample]:
        return [self.encoder.encode(task, ex.sentence, ex.label, index=i) for i, (task, ex) in enumerate(items)]

    def task_loss_sum(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed token cross-entropy over the batch's answer tokens, answer logits)."""
        with self.autocast():
            logits = self.answer_logits(model, batch)
        return F.cross_entropy(logits.float(), batch["target_ids"], reduction="sum"), logits


def prefix_cache(model: torch.nn.Module, prefix: torch.Tensor, rows: int) -> tuple[str, object] | None:
    """The key/value cache of `prefix` ([1, P] token ids), repeated for `rows` rows, as the
    (keyword, cache) the next forward takes; None where the model gives no cache (gradient
    checkpointing turns caching off). Computed with gradients: they reach the prefix's
    adapters once, summed over the rows that used it."""
    out = model(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True, logits_to_keep=1)
    # transformers renamed `past_key_values` to `cache` (outputs and forward) during 5.x.
    keyword = "cache" if "cache" in out else "past_key_values"
    cache = out.get(keyword)
    if cache is None:
        return None
    cache.batch_repeat_interleave(rows)
    return keyword, cache


def mask_answer_logits(model, input_ids, attention_mask, rows, positions, **forward) -> torch.Tensor:
    """[len(rows), vocab] logits at (rows[i], positions[i]) through the model's forward.

    transformers' `logits_to_keep` takes a boolean [batch, length] mask and returns the kept
    positions flattened row by row: the order `collate_train` lists targets in (row, then
    position). ValueError where the model (or transformers version) does not take a mask."""
    key = rows * input_ids.shape[1] + positions
    if key.numel() > 1 and not bool((key[1:] > key[:-1]).all()):
        raise ValueError("answer targets must be listed row by row, positions increasing")
    keep = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    keep[rows, positions] = True
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep,
                   **forward).logits
    if logits.dim() != 2 or logits.shape[0] != rows.numel():
        raise ValueError(f"logits_to_keep with a mask gave logits of shape {tuple(logits.shape)}")
    return logits


def union_answer_logits(model, input_ids, attention_mask, rows, positions, **forward) -> torch.Tensor:
    """The same logits from the union of the answer positions (a 1-D `logits_to_keep`, kept for
    every row), for models without mask support: more head work, the same values."""
    union, index = torch.unique(positions, return_inverse=True)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                   logits_to_keep=union, **forward).logits
    return logits[rows, index]
