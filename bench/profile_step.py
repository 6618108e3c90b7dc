"""Where a training step's time goes: torch.profiler over 3 dealcl LoRA steps on smollm2-135m
(agnews, batch 8, bf16 autocast where available), top operators by self CPU time.

    python bench/profile_step.py
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from dealcl.data.loading import default_data_dir, load_task
from dealcl.methods import REGISTRY, Stage
from dealcl.models.loading import load_model
from dealcl.prompts import PromptEncoder
from dealcl.train.loop import TrainingServices, TrainSettings, resolve_precision, train_stage


def main() -> None:
    task = load_task("agnews", default_data_dir(), train_per_task=40)
    loaded = load_model("smollm2-135m")
    precision = resolve_precision("auto", torch.device("cpu"))
    services = TrainingServices(PromptEncoder(loaded.tokenizer, "causal"), "causal", precision, torch.device("cpu"))
    method = REGISTRY["seqlora"](REGISTRY["seqlora"].config_class(rank=8), services)
    model = method.prepare_model(loaded.model)
    items = [(task, e) for e in task.train]
    settings = TrainSettings(lr=5e-4, batch_size=8, seed=0)
    train_stage(model, method, Stage(1, task.name, [task]), items[:16], settings, services, progress=False)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        stats = train_stage(model, method, Stage(2, task.name, [task]), items[16:40], settings, services, progress=False)
    print(f"precision {precision}, {stats['train_seconds'] / stats['train_steps']:.2f} s/step, "
          f"{stats['computed_tokens'] / stats['train_steps']:.0f} tokens/step")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))


if __name__ == "__main__":
    main()
