"""Speed, side by side on this machine: dealcl against the plain Hugging Face path.

    python bench/speed.py [--quick] [--parts train,eval,flops,methods,memory,scaling] [--json FILE]

Every part runs in its own process (so peak memory is that part's own) on the embedded
SmolLM2-135M and the CL_Benchmark data, and the script ends with one table of ratios:

- train:   training examples/s of dealcl's loop (bf16 autocast where the CPU has it, LM head at
           the answer positions only, dynamic padding) vs `transformers.Trainer` + PEFT LoRA in
           fp32 with `DataCollatorForSeq2Seq` and the loss over the whole sequence (upstream's
           LLaMA path); same 256 agnews examples, batch 8, LoRA r 8 on q,v, lr 5e-4, one epoch.
           Quality: held-out exact match of both trained adapters, same evaluator.
- eval:    test examples/s of dealcl's batched evaluator vs `model.generate` per example in
           fp32, and whether batched predictions equal per-example ones in the same dtype.
- flops:   training FLOP/s as a fraction of this machine's measured bf16 matmul rate.
- methods: deal, olora, gorp training throughput and peak memory relative to seqlora (task 2).
- memory:  peak RSS of seqlora training at batch 8 with 256-token prompts, gradient
           checkpointing off and on.
- scaling: total run time and evaluation share for 3 vs 15 tasks (small caps).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PARTS = ("train", "eval", "flops", "methods", "memory", "scaling")
MODEL = "smollm2-135m"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _task(name: str, train: int, test: int, val: int = 0):
    from dealcl.data.loading import default_data_dir, load_task

    return load_task(name, default_data_dir(), train_per_task=train, test_per_task=test, val_per_task=val)


def _services(loaded, precision: str, max_source_length: int = 512):
    from dealcl.train.batching import PromptEncoder
    from dealcl.train.loop import TrainingServices

    encoder = PromptEncoder(loaded.tokenizer, loaded.arch, max_source_length)
    return TrainingServices(encoder, loaded.arch, precision, torch.device("cpu"))


def _exact_match(model, services, task, batch_size: int = 16) -> float:
    from dealcl.eval.generate import generate_answers
    from dealcl.eval.metrics import score_task

    answers, _ = generate_answers(model, services.encoder, task, [e.sentence for e in task.test], arch=services.arch,
                                  batch_size=batch_size, device=services.device, autocast=services.autocast, progress=False)
    return score_task(answers, [e.label for e in task.test], task.labels)["exact_match"]


def _seqlora(services, model, rank: int = 8):
    from dealcl.methods import REGISTRY

    method_class = REGISTRY["seqlora"]
    method = method_class(method_class.config_class(rank=rank), services)
    return method, method.prepare_model(model)


# ---- parts (each runs in its own process) -------------------------------------------------------
def part_train_dealcl(n_train: int, n_test: int) -> dict:
    from dealcl.methods import Stage
    from dealcl.models.loading import load_model
    from dealcl.train.loop import TrainSettings, resolve_precision, train_stage

    task = _task("agnews", n_train, n_test)
    loaded = load_model(MODEL)
    services = _services(loaded, resolve_precision("auto", torch.device("cpu")))
    method, model = _seqlora(services, loaded.model)
    stage = Stage(1, task.name, [task])
    stats = train_stage(model, method, stage, [(task, e) for e in task.train],
                        TrainSettings(lr=5e-4, epochs=1, batch_size=8, seed=42), services, progress=False)
    return {"samples_per_s": stats["train_samples_per_second"], "seconds": stats["train_seconds"],
            "computed_tokens": stats["computed_tokens"], "answer_tokens": stats["answer_tokens"],
            "precision": services.precision, "exact_match": _exact_match(model, services, task),
            "peak_rss_mb": peak_rss_mb()}


def part_train_hf(n_train: int, n_test: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from dealcl.models.loading import load_model
    from dealcl.train.loop import resolve_precision

    task = _task("agnews", n_train, n_test)
    loaded = load_model(MODEL)
    services = _services(loaded, "fp32")
    model = get_peft_model(loaded.model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1,
                                                    target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    rows = []
    for example in task.train:  # the same tokens dealcl trains on; labels = the whole sequence
        encoded = services.encoder.encode(task, example.sentence, example.label)
        ids = encoded.prompt_ids + encoded.answer_ids
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=8, num_train_epochs=1, learning_rate=5e-4,
            lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, seed=42, save_strategy="no",
            report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no", dataloader_num_workers=0,
        )
        collator = DataCollatorForSeq2Seq(loaded.tokenizer, padding="longest", label_pad_token_id=-100)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    eval_services = _services(loaded, resolve_precision("auto", torch.device("cpu")))  # same evaluator as dealcl's
    return {"samples_per_s": len(rows) / seconds, "seconds": seconds,
            "exact_match": _exact_match(model, eval_services, task), "peak_rss_mb": peak_rss_mb()}


def part_eval(n_test: int) -> dict:
    from transformers import GenerationConfig

    from dealcl.eval.generate import MAX_NEW_TOKENS, generate_answers
    from dealcl.eval.metrics import exact_match
    from dealcl.models.loading import load_model
    from dealcl.train.loop import resolve_precision

    task = _task("agnews", 8, n_test)
    loaded = load_model(MODEL)
    model, tokenizer = loaded.model, loaded.tokenizer
    sentences = [e.sentence for e in task.test]
    fp32 = _services(loaded, "fp32")
    fast = _services(loaded, resolve_precision("auto", torch.device("cpu")))
    max_new = MAX_NEW_TOKENS

    # The plain path: one `generate` call per example, fp32.
    config = GenerationConfig(max_new_tokens=max_new, do_sample=False, pad_token_id=fp32.encoder.pad_id,
                              eos_token_id=tokenizer.eos_token_id)
    started = time.perf_counter()
    plain = []
    with torch.no_grad():
        for sentence in sentences:
            ids = torch.tensor([fp32.encoder.prompt_ids(task, sentence)])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
            plain.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    plain_seconds = time.perf_counter() - started

    def run(services, batch_size):
        return generate_answers(model, services.encoder, task, sentences, arch="causal", batch_size=batch_size,
                                device=services.device, autocast=services.autocast, progress=False)

    batched, batched_seconds = run(fast, 16)
    single_fast, _ = run(fast, 1)
    batched_fp32, _ = run(fp32, 16)
    return {
        "n": len(sentences), "plain_per_example_fp32_s": plain_seconds / len(sentences),
        "dealcl_per_example_s": batched_seconds / len(sentences), "precision": fast.precision,
        "speedup": plain_seconds / batched_seconds,
        "same_as_single_same_dtype": sum(a == b for a, b in zip(batched, single_fast)) / len(sentences),
        # Same exact-match decision (the early stop shortens invalid answers, never changes one).
        "fp32_batched_same_as_plain": sum(exact_match(a, label) == exact_match(b, label)
                                          for a, b in zip(batched_fp32, plain) for label in task.labels)
                                      / (len(sentences) * len(task.labels)),
    }


def part_matmul_peak() -> dict:
    """This machine's bf16 (or fp32) matmul rate: the ceiling for training FLOP/s."""
    from dealcl.train.loop import cpu_has_bf16

    dtype = torch.bfloat16 if cpu_has_bf16() else torch.float32
    a = torch.randn(2048, 2048, dtype=dtype)
    b = torch.randn(2048, 2048, dtype=dtype)
    for _ in range(3):
        a @ b
    reps, started = 0, time.perf_counter()
    while time.perf_counter() - started < 3.0:
        a @ b
        reps += 1
    seconds = time.perf_counter() - started
    return {"dtype": str(dtype), "flops_per_s": 2 * 2048**3 * reps / seconds}


def training_flops(computed_tokens: int, answer_tokens: int, mean_length: float) -> float:
    """FLOPs of a LoRA step on smollm2-135m over the tokens actually computed.

    Frozen linear layers: 2N forward + 2N for input gradients (no weight gradients) per token;
    attention scores and values: 4·T·d per token per layer forward, twice that backward; the LM
    head at answer positions only (forward + input gradient); LoRA r 8 on q,v: 6 FLOPs per weight.
    """
    from transformers import AutoConfig

    from dealcl.models.loading import cache_root

    folder = next(cache_root().glob("SmolLM2-135M-Instruct*"))
    c = AutoConfig.from_pretrained(folder)
    d, layers, inter, vocab = c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size
    kv = d * c.num_key_value_heads // c.num_attention_heads
    linear = layers * (d * d * 2 + d * kv * 2 + 3 * d * inter)
    lora = layers * 8 * ((d + d) + (d + kv))
    per_token = 4 * linear + 3 * 4 * mean_length * d * layers / 2 + 6 * lora  # causal: half the scores
    return computed_tokens * per_token + answer_tokens * 4 * d * vocab


def part_methods(n_first: int, n_timed: int) -> dict:
    """One method's task-2 throughput and peak memory (task 1 untimed: DEAL's filter and MLP,
    O-LoRA's orthogonality and GORP's memory only act from task 2 on)."""
    from dealcl.methods import REGISTRY, Stage
    from dealcl.models.loading import load_model
    from dealcl.runs.config import method_config
    from dealcl.train.loop import TrainSettings, resolve_precision, train_stage

    # "deal:8" is deal at LoRA rank 8 (seqlora's rank), separating DEAL's own overhead from
    # the cost of its larger default rank (32 on LLaMA-family models).
    name, _, rank = os.environ["BENCH_METHOD"].partition(":")
    first, second = _task("dbpedia", n_first, 8), _task("agnews", n_timed, 8)
    loaded = load_model(MODEL)
    services = _services(loaded, resolve_precision("auto", torch.device("cpu")))
    method_class = REGISTRY[name]
    method = method_class(method_config(method_class.config_class, {"rank": int(rank)} if rank else {}, name), services)
    model = method.prepare_model(loaded.model)
    stats = {}
    for index, task in enumerate((first, second), 1):
        stage = Stage(index, task.name, [task])
        method.on_task_start(model, stage)
        stats = train_stage(model, method, stage, method.training_items(stage),
                            TrainSettings(lr=method_class.default_lr, epochs=1, batch_size=8, seed=42), services,
                            progress=False)
        method.on_task_end(model, stage)
    return {"samples_per_s": stats["train_samples_per_second"], "peak_rss_mb": peak_rss_mb(),
            "trainable_parameters": stats["trainable_parameters"]}


def part_memory(steps: int) -> dict:
    from dealcl.methods import Stage
    from dealcl.models.loading import load_model
    from dealcl.train.loop import TrainSettings, enable_gradient_checkpointing, resolve_precision, train_stage

    checkpointing = os.environ.get("BENCH_CHECKPOINTING") == "1"
    task = _task("yahoo", 400, 8)
    loaded = load_model(MODEL)
    services = _services(loaded, resolve_precision("auto", torch.device("cpu")), max_source_length=256)
    # The longest prompts, so that every one is cut to 256 tokens.
    examples = sorted(task.train, key=lambda e: -len(e.sentence))[: 8 * steps]
    method, model = _seqlora(services, loaded.model)
    if checkpointing:
        enable_gradient_checkpointing(model)
    stats = train_stage(model, method, Stage(1, task.name, [task]), [(task, e) for e in examples],
                        TrainSettings(lr=5e-4, epochs=1, batch_size=8, seed=42), services, progress=False)
    tokens = stats["computed_tokens"] / (8 * steps)
    return {"peak_rss_mb": peak_rss_mb(), "seconds_per_step": stats["train_seconds"] / steps,
            "mean_sequence_tokens": tokens, "checkpointing": checkpointing}


def part_scaling(n_train: int, n_test: int) -> dict:
    from dealcl.runs.config import RunConfig
    from dealcl.runs.driver import run_continual

    benchmark, order = os.environ["BENCH_BENCHMARK"], os.environ.get("BENCH_ORDER")
    with tempfile.TemporaryDirectory() as tmp:
        config = RunConfig(method="seqlora", model=MODEL, benchmark=benchmark, order=int(order) if order else None,
                           train_per_task=n_train, test_per_task=n_test)
        started = time.perf_counter()
        run_continual(config, Path(tmp) / "run", progress=False)
        total = time.perf_counter() - started
        stages = json.loads((Path(tmp) / "run" / "efficiency.json").read_text())["stages"]
    return {"tasks": len(stages), "total_s": total, "train_s": sum(s["train_seconds"] for s in stages),
            "eval_s": sum(s["eval_seconds"] for s in stages), "eval_examples": sum(s["eval_examples"] for s in stages)}


# ---- the driver --------------------------------------------------------------------------------
class Rows:
    """Result rows, printed as each is measured (a long run keeps what it has) and at the end
    as one table; the raw measurements go to --json after every row."""

    WIDTH = 40

    def __init__(self, json_path: Path | None, measured: dict) -> None:
        self.rows: list[tuple[str, str, str, str]] = []
        self.json_path, self.measured = json_path, measured
        print(f"{'measure':<{self.WIDTH}}  {'dealcl':>16}  {'baseline':>16}  ratio", flush=True)

    def append(self, row: tuple[str, str, str, str]) -> None:
        self.rows.append(row)
        print(self._line(row), flush=True)
        if self.json_path:
            self.json_path.write_text(json.dumps(self.measured, indent=2))

    def _line(self, row) -> str:
        what, ours_text, base_text, ratio = row
        return f"{what:<{self.WIDTH}}  {ours_text:>16}  {base_text:>16}  {ratio}"

    def table(self) -> None:
        print("\n== summary ==")
        for row in self.rows:
            print(self._line(row))


def _subprocess(part: str, args: list[str], env: dict[str, str] | None = None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, __file__, "--run-part", part, "--part-output", out.name, *args]
        done = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"part {part} failed:\n{done.stderr[-3000:]}")
        return json.loads(Path(out.name).read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a smoke test of the script, not a measurement")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--methods", default="seqlora,deal:8,deal,olora,gorp",
                        help="methods at their defaults; NAME:R forces LoRA rank R (seqlora's default is 8)")
    parser.add_argument("--run-part", help=argparse.SUPPRESS)
    parser.add_argument("--part-output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    n_train, n_test, n_eval = (32, 16, 16) if args.quick else (256, 100, 48)

    if args.run_part:
        part = args.run_part
        result = {
            "train-dealcl": lambda: part_train_dealcl(n_train, n_test),
            "train-hf": lambda: part_train_hf(n_train, n_test),
            "eval": lambda: part_eval(n_eval),
            "matmul": part_matmul_peak,
            "methods": lambda: part_methods(16 if args.quick else 64, 16 if args.quick else 96),
            "memory": lambda: part_memory(2 if args.quick else 4),
            "scaling": lambda: part_scaling(4, 2 if args.quick else 4),  # 15 tasks x 8 test examples alone took 10 min
        }[part]()
        Path(args.part_output).write_text(json.dumps(result))
        return 0

    parts = [p for p in args.parts.split(",") if p]
    measured: dict = {"machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                                  "torch": torch.__version__}}
    rows = Rows(args.json, measured)

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if "train" in parts or "flops" in parts:
        say("train: dealcl loop …")
        ours = measured["train_dealcl"] = _subprocess("train-dealcl", sys.argv[1:])
    if "train" in parts:
        say("train: transformers.Trainer + PEFT, fp32 …")
        hf = measured["train_hf"] = _subprocess("train-hf", sys.argv[1:])
        rows.append(("training examples/s", f"{ours['samples_per_s']:.2f}", f"{hf['samples_per_s']:.2f}",
                     f"{ours['samples_per_s'] / hf['samples_per_s']:.2f}x  (target >= 3x)"))
        rows.append(("held-out EM after 1 epoch", f"{ours['exact_match']:.1f}", f"{hf['exact_match']:.1f}",
                     f"{ours['exact_match'] - hf['exact_match']:+.1f} pts  (target within 3)"))
    if "flops" in parts:
        say("flops: matmul peak …")
        peak = measured["matmul_peak"] = _subprocess("matmul", sys.argv[1:])
        mean_length = ours["computed_tokens"] / max(1, n_train)
        flops = training_flops(ours["computed_tokens"], ours["answer_tokens"], mean_length)
        rate = flops / ours["seconds"]
        measured["training_flops_per_s"] = rate
        rows.append(("training FLOP/s / matmul peak", f"{rate / 1e9:.1f} GFLOP/s", f"{peak['flops_per_s'] / 1e9:.1f} GFLOP/s",
                     f"{rate / peak['flops_per_s']:.0%}  (target >= 50%)"))
    if "eval" in parts:
        say("eval: per-example fp32 generate vs dealcl evaluator …")
        ev = measured["eval"] = _subprocess("eval", sys.argv[1:])
        rows.append(("eval s/example", f"{ev['dealcl_per_example_s']:.3f}", f"{ev['plain_per_example_fp32_s']:.3f}",
                     f"{ev['speedup']:.2f}x  (target >= 3x)"))
        rows.append(("batched = per-example, same dtype", f"{ev['same_as_single_same_dtype']:.0%}", "", f"({ev['precision']})"))
        rows.append(("fp32 batched = plain fp32 generate", f"{ev['fp32_batched_same_as_plain']:.0%}", "", ""))
    if "methods" in parts:
        methods = [m for m in args.methods.split(",") if m]
        results = {}
        for name in methods:
            say(f"methods: {name} …")
            try:
                results[name] = _subprocess("methods", sys.argv[1:], {"BENCH_METHOD": name})
            except SystemExit as exc:
                say(str(exc)[-500:])
        measured["methods"] = results
        base = results.get("seqlora")
        for name, r in results.items():
            if name == "seqlora" or base is None:
                continue
            label = name.replace(":", " r") if ":" in name else f"{name} (default rank)"
            target = name.startswith("deal:")  # the targets compare DEAL and LoRA at the same rank
            rows.append((f"{label} vs seqlora: train speed", f"{r['samples_per_s']:.2f}", f"{base['samples_per_s']:.2f}",
                         f"{r['samples_per_s'] / base['samples_per_s']:.2f}x" + ("  (target >= 0.9x)" if target else "")))
            rows.append((f"{label} vs seqlora: peak RSS MB", f"{r['peak_rss_mb']:.0f}", f"{base['peak_rss_mb']:.0f}",
                         f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x" + ("  (target <= 1.05x)" if target else "")))
    if "memory" in parts:
        say("memory: batch 8 x 256 tokens …")
        off = _subprocess("memory", sys.argv[1:], {"BENCH_CHECKPOINTING": "0"})
        on = _subprocess("memory", sys.argv[1:], {"BENCH_CHECKPOINTING": "1"})
        measured["memory"] = {"off": off, "on": on}
        rows.append(("peak RSS MB, checkpointing off / on", f"{off['peak_rss_mb']:.0f}", f"{on['peak_rss_mb']:.0f}",
                     "target <= 3072 MB"))
        rows.append(("s/step, checkpointing off / on", f"{off['seconds_per_step']:.2f}", f"{on['seconds_per_step']:.2f}",
                     f"{on['seconds_per_step'] / off['seconds_per_step']:.2f}x slower with checkpointing"))
    if "scaling" in parts:
        say("scaling: 3 tasks …")
        three = _subprocess("scaling", sys.argv[1:], {"BENCH_BENCHMARK": "tc"})
        say("scaling: 15 tasks …")
        fifteen = _subprocess("scaling", sys.argv[1:], {"BENCH_BENCHMARK": "long", "BENCH_ORDER": "4"})
        measured["scaling"] = {"3": three, "15": fifteen}
        for r in (three, fifteen):
            rows.append((f"{r['tasks']}-task run: total s (eval share)", f"{r['total_s']:.0f}",
                         f"{r['eval_s'] / r['total_s']:.0%}", f"{r['eval_examples']} eval examples"))
        rows.append(("15 vs 3 tasks: total time", "", "", f"{fifteen['total_s'] / three['total_s']:.1f}x"))

    rows.table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
