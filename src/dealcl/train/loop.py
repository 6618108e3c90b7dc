"""The one training loop. It calls the method's hooks (hooks.py) and never names a method.

Per optimizer step it takes `batch_size × grad_accum` examples, splits them into micro-batches
padded to their own longest sequence, and normalises the summed token cross-entropy by the
number of answer tokens in the whole step, so gradient accumulation gives exactly the gradient
of one big batch (and, later, of a batch sharded over processes).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import NonFiniteLossError
from ..faults import fault_point, trace_shard
from ..models import unwrap
from .batching import collate_train, num_targets
from .hardware import cpu_has_bf16, resolve_precision  # noqa: F401 (re-exported for the driver and benches)
from .hooks import Stage, TrainingHooks, TrainItem
from .services import TrainingServices

log = logging.getLogger("dealcl")


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each layer's activations in backward. With a frozen base, the inputs must
    require grad or the checkpointed segments would pass no gradient to the adapters."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


@dataclass
class TrainSettings:
    lr: float
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    seed: int = 42
    log_every: int = 10
    group_by_length: bool = True
    micro_batch_tokens: int | None = None  # at most this many padded tokens per micro-batch (None: rows only)


# Micro-batches on a CPU hold at most this many padded tokens (rows × longest sequence), and
# eager attention is used up to this sequence width (docs/PERFORMANCE.md, "Memory").
CPU_MICRO_BATCH_TOKENS = 1024
EAGER_MAX_WIDTH = 256


class TrainingAttention:
    """The attention kernel per micro-batch while training on a CPU.

    Eager attention is faster on short sequences (PyTorch's CPU SDPA kernel with a padding
    mask took 30% of a ~110-token smollm2 step; eager made the step 1.26× faster) but keeps
    every layer's [batch, heads, width, width] weights for backward: at 512 tokens that is most
    of the step's memory. So: eager up to EAGER_MAX_WIDTH tokens, the model's own (SDPA) above.
    GPUs keep the model's own kernel throughout."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.lm = unwrap(model)
        self.setter = getattr(self.lm, "set_attn_implementation", None)
        self.original = getattr(getattr(self.lm, "config", None), "_attn_implementation", None)
        self.enabled = device.type == "cpu" and self.setter is not None and self.original not in (None, "eager")
        self.current = self.original

    def use_for(self, width: int) -> None:
        if not self.enabled:
            return
        wanted = "eager" if width <= EAGER_MAX_WIDTH else self.original
        if wanted != self.current:
            try:
                self.setter(wanted)
            except (ValueError, ImportError):  # a model without an eager path keeps its own
                self.enabled = False
                return
            self.current = wanted

    def restore(self) -> None:
        if self.enabled and self.current != self.original:
            self.setter(self.original)
            self.current = self.original


@contextlib.contextmanager
def bf16_fast_paths(model: torch.nn.Module, precision: str, adapters: set[torch.nn.Module] = frozenset()):
    """Under bf16 autocast, skip casts whose result is known in advance.

    - Frozen linear weights are held in bf16 for the stage. Autocast re-casts every frozen
      fp32 weight on every forward (it caches casts only for trainable leaves): 5% of a
      smollm2 step. The cast is deterministic, so a weight cast once gives the same matmuls.
      Trainable weights, the method's adapter modules (`adapters`: LoRA factors, which methods
      read in fp32, frozen or not) and weights tied to an embedding are left alone, and the fp32 tensors are put back afterwards, so checkpoints
      see exactly the weights they saw before. CPU only: on a GPU the bf16 copies would cost
      memory that big models need (use model_dtype=bf16 there). Evaluation gains nothing from
      it (0.082 vs 0.084 s per example on smollm2), so it is used for training only.
    - PEFT's LoRA layers cast their bf16 input up to the fp32 adapter dtype, and autocast casts
      it straight back down for the adapter matmul: two copies of the activations per adapted
      module. PEFT's own `disable_input_dtype_casting` keeps the input in bf16."""
    if precision != "bf16":
        yield
        return
    from peft.helpers import disable_input_dtype_casting

    lm = unwrap(model)
    embeddings = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else None
    tied = {id(embeddings.weight)} if embeddings is not None else set()
    kept: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (type(module) is not torch.nn.Linear or module in adapters or weight is None or weight.requires_grad
                or weight.dtype != torch.float32 or id(weight) in tied or weight.device.type != "cpu"
                or type(weight) is not torch.nn.Parameter):  # FSDP's sharded weights are its own
            continue
        kept.append((weight, weight.data))
        weight.data = weight.data.to(torch.bfloat16)
    try:
        with disable_input_dtype_casting(model):
            yield
    finally:
        for weight, original in kept:
            weight.data = original


class MasterWeights:
    """fp32 master copies of trained parameters stored in 16 bits (model_dtype=bf16: SeqFT's
    weights, GORP's full-rank group).

    An Adam step moves a weight by about lr, far below a bf16 weight's rounding step (2⁻⁸ of
    its size): applied to the bf16 tensor directly most updates round away (measured: 30 GORP
    steps on a 4096×1024 bf16 weight changed 11.5 % of its entries, fp32 all of them). Here the
    optimizer steps on an fp32 copy, with fp32 state, and the model's 16-bit tensor receives the
    rounded result after every step. The copies live for one stage; a stage ends, and its
    checkpoint is written, in the model's dtype."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        low = [p for p in params if p.dtype in (torch.bfloat16, torch.float16)]
        self.pairs = [(p, p.detach().float()) for p in low]

    @contextlib.contextmanager
    def fp32_step(self):
        """Within: every low-precision parameter holds its fp32 master and an fp32 gradient."""
        if not self.pairs:
            yield
            return
        stored = []
        for p, master in self.pairs:
            stored.append(p.data)
            grad = None if p.grad is None else p.grad.float()
            p.grad = None
            p.data = master
            p.grad = grad
        try:
            yield
        finally:
            for (p, master), low in zip(self.pairs, stored):
                p.grad = None
                low.copy_(master)  # round to the model's dtype
                p.data = low


def _keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """Bernoulli(1-p) keep mask from 16 random bits per element (p rounded to 1/65536).

    On a CPU `bernoulli_` draws one double per element: 2.3 ms for a [900, 576] mask, four
    times the bf16 matmul it feeds. Cutting 64-bit random words into four int16 lanes gives the
    same distribution in 0.4 ms."""
    count = math.prod(shape)
    words = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    threshold = -32768 + round(p * 65536)
    return (words.view(torch.int16)[:count] >= threshold).view(shape)


class FastDropout(torch.nn.Dropout):
    """nn.Dropout with `_keep_mask` on a CPU; identical in distribution, and in evaluation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        return x * _keep_mask(x.shape, self.p) * (1.0 / (1.0 - self.p))


def use_fast_dropout(adapters: set[torch.nn.Module]) -> None:
    """Swap the adapters' dropouts (PEFT's `lora_dropout`, one per adapted module: 60 masks per
    smollm2 forward, 11% of a step) for FastDropout; new adapters are swapped at their stage.
    The base model's own dropouts keep torch's, so its random stream is left as it was."""
    for module in adapters:
        if type(module) is torch.nn.Dropout:
            module.__class__ = FastDropout


def _steps(order: list[int], step_size: int) -> list[list[int]]:
    return [order[i : i + step_size] for i in range(0, len(order), step_size)]


def micro_batch_chunks(indices: list[int], lengths: list[int], batch_size: int, budget: int | None) -> list[list[int]]:
    """A step's examples in micro-batches of at most `batch_size` rows and, with a `budget`, at
    most `budget` padded tokens (rows × the longest; one row at least).

    A chunk within the budget keeps its order, so short data trains exactly as without one; a
    chunk over it is split longest first, so that rows of similar length share a micro-batch.
    The step's loss and gradient are the same either way (normalised by the step's tokens)."""
    chunks = []
    for chunk in _steps(indices, batch_size):
        if budget is None or len(chunk) * max(lengths[i] for i in chunk) <= budget:
            chunks.append(chunk)
            continue
        current: list[int] = []
        for i in sorted(chunk, key=lambda i: -lengths[i]):
            if current and (len(current) + 1) * lengths[current[0]] > budget:
                chunks.append(current)
                current = []
            current.append(i)
        chunks.append(current)
    return chunks


LENGTH_WINDOW_STEPS = 16


def _epoch_steps(order: list[int], step_size: int, lengths: list[int], group_by_length: bool,
                 generator: torch.Generator) -> list[list[int]]:
    """The epoch's optimizer steps. Grouping by length sorts each window of 16 steps' worth of
    shuffled examples by length, cuts it into steps and shuffles the steps again: batches pad
    little (every micro-batch is padded to its own longest sequence) and their order stays random."""
    if not group_by_length:
        return _steps(order, step_size)
    steps: list[list[int]] = []
    window = step_size * LENGTH_WINDOW_STEPS
    for start in range(0, len(order), window):
        steps += _steps(sorted(order[start : start + window], key=lengths.__getitem__), step_size)
    return [steps[i] for i in torch.randperm(len(steps), generator=generator).tolist()]


def train_stage(
    model: torch.nn.Module,
    method: TrainingHooks,
    stage: Stage,
    items: list[TrainItem],
    settings: TrainSettings,
    services: TrainingServices,
    progress: bool = True,
) -> dict:
    """Train `model` on `items` for one stage; return throughput and loss statistics."""
    attention = TrainingAttention(model, services.device)
    adapters = method.adapter_modules(model)
    use_fast_dropout(adapters)
    try:
        with bf16_fast_paths(model, services.precision, adapters):
            return _train_stage(model, method, stage, items, settings, services, progress, attention)
    finally:
        attention.restore()


def _train_stage(model, method, stage, items, settings, services, progress, attention) -> dict:
    model.train()
    optimizer = method.build_optimizer(model, settings.lr)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    unclipped = {id(p) for p in method.unclipped_parameters(model)}
    clipped = [p for p in params if id(p) not in unclipped]
    masters = MasterWeights(params)
    method.before_training(model, stage, items)
    encoded = services.encode_items(items)
    # The stage's randomness (data order, dropout) depends only on the seed and the stage index,
    # so a resumed run retrains a stage exactly as an uninterrupted one would.
    stage_seed = settings.seed * 1000 + stage.index
    generator = torch.Generator().manual_seed(stage_seed)
    torch.manual_seed(stage_seed)

    step_size = settings.batch_size * settings.grad_accum
    lengths = [len(e.prompt_ids) + len(e.answer_ids) for e in encoded]
    steps_per_epoch = math.ceil(len(encoded) / step_size)
    total_steps = steps_per_epoch * settings.epochs
    bar = tqdm(total=total_steps, desc=f"train {stage.index}-{stage.name}", disable=not progress, leave=False)
    started = time.perf_counter()
    step = 0
    running: dict[str, float] = {}
    last_logged: dict[str, float] = {}
    computed_tokens = answer_tokens = 0  # for FLOP accounting (bench/speed.py)
    step_losses: list[float] = []
    step_loss_terms: dict[str, list[float]] = {}  # term -> its value per step (0 before a term first appears)
    ranks = services.processes
    for _epoch in range(settings.epochs):
        order = torch.randperm(len(encoded), generator=generator).tolist()
        for step_indices in _epoch_steps(order, step_size, lengths, settings.group_by_length, generator):
            step += 1
            # The step's global batch is the same on every rank; each rank computes its shard
            # and the loss is normalised by the global answer-token count (train/distributed.py).
            step_targets = sum(len(encoded[i].answer_ids) for i in step_indices)
            shard = ranks.shard(step_indices)
            trace_shard(ranks.rank, stage.index, shard)
            micro_batches = [
                services.to_device(collate_train([encoded[i] for i in chunk], services.arch, services.encoder.pad_id))
                for chunk in micro_batch_chunks(shard, lengths, settings.batch_size, settings.micro_batch_tokens)
            ]
            computed_tokens += sum(services.computed_tokens(model, b) for b in micro_batches)
            answer_tokens += step_targets
            # With sharded base weights every forward is a collective: a rank with fewer
            # micro-batches runs fillers (a copy of one of the step's examples) that count zero.
            real = len(micro_batches)
            fillers = ranks.lockstep_count(real) - real
            if fillers:
                micro_batches += [services.to_device(collate_train(
                    [encoded[step_indices[0]]], services.arch, services.encoder.pad_id))] * fillers
            terms_this_step: dict[str, float] = {"task": 0.0}
            for k, batch in enumerate(micro_batches):
                weight = 1.0 if k < real else 0.0
                share = weight * num_targets(batch) / step_targets
                attention.use_for(batch["input_ids"].shape[1])
                loss_sum, logits = services.task_loss_sum(model, batch)
                task_loss = loss_sum / step_targets if weight else loss_sum * 0.0
                extras = method.extra_losses(model, batch, logits)
                loss = task_loss + sum((term * share for term in extras.values()), torch.zeros((), device=task_loss.device))
                loss.backward()
                terms_this_step["task"] += float(task_loss.detach())
                for name, term in extras.items():
                    terms_this_step[name] = terms_this_step.get(name, 0.0) + float(term.detach()) * share
            terms_this_step = ranks.sum_values(terms_this_step)
            step_loss = sum(terms_this_step.values())
            if not math.isfinite(step_loss):
                raise NonFiniteLossError(
                    f"non-finite loss ({step_loss}) in task '{stage.name}' (stage {stage.index}) at step {step}; "
                    f"the last finished stage is kept: lower the learning rate (now lr={settings.lr:g}, "
                    f"try lr={settings.lr / 10:g}) or use precision=fp32, then `dealcl resume`"
                )
            step_losses.append(step_loss)
            for name, value in terms_this_step.items():
                step_loss_terms.setdefault(name, [0.0] * (step - 1)).append(value)
            for name, values in step_loss_terms.items():
                if len(values) < step:  # a term this step did not add
                    values.append(0.0)
            ranks.sum_gradients(params)
            method.after_backward(model)
            if settings.max_grad_norm and settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(clipped, settings.max_grad_norm)
            with masters.fp32_step():
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            fault_point("train-step")
            for name, value in terms_this_step.items():
                running[name] = running.get(name, 0.0) + value
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            services.on_trained(len(step_indices))
            services.on_step(step, terms_this_step, optimizer.param_groups[0]["lr"])
            if step % settings.log_every == 0 or step == total_steps:
                last_logged = {k: v / step for k, v in running.items()}
                log.info(
                    "stage %d-%s step %d/%d %s", stage.index, stage.name, step, total_steps,
                    " ".join(f"{k}={v:.4f}" for k, v in terms_this_step.items()),
                )
    bar.close()
    seconds = time.perf_counter() - started
    examples = len(encoded) * settings.epochs
    return {
        "train_examples": examples,
        "train_steps": step,
        "train_seconds": seconds,
        "train_samples_per_second": examples / seconds if seconds > 0 else None,
        "mean_loss_terms": last_logged or {k: v / max(step, 1) for k, v in running.items()},
        "trainable_parameters": sum(p.numel() for p in params),
        "computed_tokens": computed_tokens,
        "step_losses": step_losses,
        "step_loss_terms": step_loss_terms,
        "answer_tokens": answer_tokens,
    }
