"""Where a training step's time goes: torch.profiler over 3 dealcl LoRA steps on smollm2-135m
(agnews, batch 8, bf16 autocast where available), top operators by self CPU time.

    python bench/profile_step.py
"""
from __future__ import annotations

from torch.profiler import ProfilerActivity, profile

from dealcl.methods import Stage
from dealcl.runs.config import RunConfig
from dealcl.runs.session import build_session
from dealcl.train.loop import train_stage


def main() -> None:
    config = RunConfig(method="seqlora", model="smollm2-135m", tasks=["agnews"], train_per_task=40, test_per_task=1,
                       lr=5e-4, seed=0, method_options={"rank": 8})
    session = build_session(config)
    task = session.tasks[0]
    items = [(task, e) for e in task.train]
    warm_up = Stage(1, task.name, [task])
    settings = session.settings(warm_up)
    train_stage(session.model, session.method, warm_up, items[:16], settings, session.services, progress=False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        stats = train_stage(session.model, session.method, Stage(2, task.name, [task]), items[16:40], settings,
                            session.services, progress=False)
    print(f"precision {session.prep.precision}, {stats['train_seconds'] / stats['train_steps']:.2f} s/step, "
          f"{stats['computed_tokens'] / stats['train_steps']:.0f} tokens/step")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))


if __name__ == "__main__":
    main()
