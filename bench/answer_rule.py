"""What upstream's exact match costs: the early stop against plain 50-token generation and the
old cap (longest label + 3 tokens), on smollm2-135m (the embedded Q4_1 GGUF, dequantized).

    python bench/answer_rule.py [--test N] [--train N]

For each task, the untouched model and the model after a short LoRA stage on that task are
asked the same N test questions three ways, side by side in one run: `cap` (the old rule),
`rule` (50 tokens, stop once no label can still match) and `plain` (50 tokens, EOS only). It
prints seconds per example and generated tokens per example for each, how many exact-match
decisions `rule` and `cap` change against `plain` (`rule` must change none), and the host.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from dealcl.data.loading import default_data_dir, load_task  # noqa: E402
from dealcl.eval.generate import MAX_NEW_TOKENS, generate_answers  # noqa: E402
from dealcl.eval.metrics import exact_match  # noqa: E402
from dealcl.methods.seqlora import SeqLora, SeqLoraConfig  # noqa: E402
from dealcl.methods.base import Stage  # noqa: E402
from dealcl.models.loading import load_model  # noqa: E402
from dealcl.prompts import PromptEncoder  # noqa: E402
from dealcl.train.loop import TrainingServices, TrainSettings, resolve_precision, train_stage  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from host import host_line  # noqa: E402


def generated_tokens(tokenizer, answers: list[str]) -> float:
    return sum(len(tokenizer(" " + a, add_special_tokens=False).input_ids) for a in answers) / len(answers)


def measure(model, encoder, task, sentences, services, arch):
    common = dict(arch=arch, batch_size=16, device=services.device, autocast=services.autocast, progress=False)
    cap = max(len(encoder.label_ids(label)) for label in task.labels) + 3
    rows = {}
    for name, kwargs in (("cap", dict(max_new_tokens=cap, stop_without_label=False)),
                         ("rule", dict()), ("plain", dict(stop_without_label=False))):
        started = time.perf_counter()
        answers, _ = generate_answers(model, encoder, task, sentences, **common, **kwargs)
        rows[name] = (answers, (time.perf_counter() - started) / len(sentences))
    labels = [e.label for e in task.test]

    def changed(name: str) -> int:
        return sum(exact_match(a, y) != exact_match(b, y) for a, b, y in zip(rows[name][0], rows["plain"][0], labels))

    return rows, changed("rule"), changed("cap"), labels


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--test", type=int, default=48)
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--tasks", default="agnews,dbpedia,amazon")
    args = parser.parse_args()
    print(host_line())
    loaded = load_model("smollm2-135m")
    device = torch.device("cpu")
    precision = resolve_precision("auto", device)
    encoder = PromptEncoder(loaded.tokenizer, "causal")
    services = TrainingServices(encoder, "causal", precision, device)
    print(f"smollm2-135m ({loaded.weights}), precision {precision}, {args.test} test examples per task, "
          f"max_new_tokens {MAX_NEW_TOKENS}")
    print("| task | model | cap s/ex | rule s/ex | plain s/ex | tokens cap / rule / plain | EM plain | "
          "decisions changed: rule | cap |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.tasks.split(","):
        task = load_task(name, default_data_dir(), train_per_task=args.train, test_per_task=args.test)
        sentences = [e.sentence for e in task.test]
        method = SeqLora(SeqLoraConfig(), services)
        model = method.prepare_model(loaded.model)
        for state in ("untouched", f"after {args.train} examples"):
            if state != "untouched":
                stage = Stage(1, task.name, [task])
                train_stage(model, method, stage, method.training_items(stage), TrainSettings(lr=1e-3, batch_size=8),
                            services, progress=False)
            rows, rule_changes, cap_changes, labels = measure(model, encoder, task, sentences, services, "causal")
            em = 100 * sum(exact_match(a, y) for a, y in zip(rows["plain"][0], labels)) / len(labels)
            tokens = " / ".join(f"{generated_tokens(loaded.tokenizer, rows[k][0]):.1f}" for k in ("cap", "rule", "plain"))
            print(f"| {name} | {state} | {rows['cap'][1]:.3f} | {rows['rule'][1]:.3f} | {rows['plain'][1]:.3f} | "
                  f"{tokens} | {em:.1f} | {rule_changes} | {cap_changes} |", flush=True)
        loaded.model = model.unload()  # the next task starts from the untouched model again
    return 0


if __name__ == "__main__":
    sys.exit(main())
