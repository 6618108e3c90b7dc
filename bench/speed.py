"""Speed and memory, side by side on this machine: dealcl against the plain Hugging Face path.

    python bench/speed.py [--quick] [--parts train,prefix,eval,memory,methods,demo,scaling]
                          [--full-demo] [--json FILE]

The script first names the host (CPU model, vector capability AVX2 / AVX512 / AVX512_BF16 / AMX,
threads) and measures its fp32 and bf16 matmul rates; the sizes of every part are then scaled
to the rate of the precision dealcl uses here, so the whole script stays under 20 minutes on
a slow AVX2-only host as on an avx512_bf16 one (`--quick`: a few minutes, a smoke test of the
script rather than a measurement). Every part runs in its own process, so a peak RSS is that
part's own, on the embedded SmolLM2-135M (a Q4_1 GGUF, dequantized) and the CL_Benchmark data.
It ends with one table of measured ratios against the targets of docs/PERFORMANCE.md:

- train:   training examples/s of dealcl's loop in the precision it picks here (bf16 autocast
           where the CPU has bf16 units) and in fp32, vs `transformers.Trainer` + PEFT LoRA in
           fp32 with `DataCollatorForSeq2Seq` and the loss over the whole sequence (upstream's
           LLaMA path); same agnews examples, batch 8, LoRA r 8 on q,v, lr 5e-4, one epoch.
           The fp32 ratio is what an AVX2-only host gets. Also each run's FLOP/s as a share of
           the measured matmul rate in the same precision, and both adapters' held-out EM.
- prefix:  the same training with the shared prompt prefix off (each prompt computed whole).
- eval:    test examples/s of dealcl's batched evaluator vs `model.generate` per example in
           fp32, and whether batched predictions equal per-example ones in the same dtype.
- memory:  peak RSS of whole standard order-1 runs (`dealcl run`, 4 tasks) trained on each
           task's longest prompts (up to 512 tokens: where a run's peak comes from) for
           seqlora, deal, olora, gorp and inclora, and of one `dealcl compare` of all five.
- methods: deal, olora, gorp training throughput relative to seqlora (task 2).
- demo:    the demo's probe: the caps it picks here and the time it expects (`--full-demo`
           also runs `dealcl demo` and measures its wall time and peak RSS).
- scaling: total run time and evaluation share for 3 vs 15 tasks (small caps).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from host import matmul_gflops  # noqa: E402

PARTS = ("train", "prefix", "eval", "memory", "methods", "demo", "scaling")
MODEL = "smollm2-135m"
# The precision-used matmul rate of the host the full sizes were chosen on (AMD EPYC with
# avx512_bf16, 2 threads: ~850 GFLOP/s bf16). A host at a tenth of it runs a tenth of the work.
REFERENCE_GFLOPS = 850.0
MEMORY_METHODS = ("seqlora", "deal", "olora", "gorp", "inclora")
STANDARD_ORDER_1 = (("TC", "dbpedia"), ("SC", "amazon"), ("TC", "yahoo"), ("TC", "agnews"))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sizes_for(scale: float, quick: bool) -> dict:
    """Examples per part at `scale` (1 on the reference host); never below what a ratio needs."""
    if quick:
        return {"train": 8, "test": 4, "eval": 4, "methods": (8, 8), "memory": (4, 2), "scaling": (2, 1)}

    def n(full: int, least: int) -> int:
        return max(least, int(round(full * scale / 8)) * 8)

    return {"train": n(256, 24), "test": n(100, 24), "eval": n(48, 8),
            "methods": (n(64, 8), n(96, 16)), "memory": (n(16, 8), n(8, 4)) if scale >= 0.25 else (4, 2),
            "scaling": (4, 2 if scale < 0.5 else 4)}


def memory_methods(scale: float, quick: bool) -> tuple[str, ...]:
    """Every method where the host is fast enough; on a slow one (an AVX2-only CPU trains at
    about a twentieth of the reference rate) the lightest and the heaviest, so the part fits."""
    if quick:
        return ("seqlora",)
    if scale >= 0.25:
        return MEMORY_METHODS
    return ("seqlora", "gorp") if scale >= 0.05 else ("seqlora",)


def _task(name: str, train: int, test: int):
    from dealcl.data.loading import default_data_dir, load_task

    return load_task(name, default_data_dir(), train_per_task=train, test_per_task=test)


def _services(loaded, precision: str, share_prefix: bool = True):
    from dealcl.prompts import PromptEncoder
    from dealcl.train.services import TrainingServices

    encoder = PromptEncoder(loaded.tokenizer, loaded.arch, 512)
    return TrainingServices(encoder, loaded.arch, precision, torch.device("cpu"), share_prefix=share_prefix)


def _exact_match(model, services, task, batch_size: int = 16) -> float:
    from dealcl.eval.generate import generate_answers
    from dealcl.eval.metrics import score_task

    answers, _ = generate_answers(model, services.encoder, task, [e.sentence for e in task.test], arch=services.arch,
                                  batch_size=batch_size, device=services.device, autocast=services.autocast, progress=False)
    return score_task(answers, [e.label for e in task.test], task.labels)["exact_match"]


# ---- parts (each runs in its own process) -------------------------------------------------------
def part_host() -> dict:
    from dealcl.train.hardware import cpu_capability, cpu_has_bf16, resolve_precision

    model, capability = cpu_capability()
    fp32 = matmul_gflops(torch.float32, 2048, 2.0)
    # Without bf16 units bf16 is emulated (~1 GFLOP/s): a smaller product says as much.
    bf16 = matmul_gflops(torch.bfloat16, 2048 if cpu_has_bf16() else 512, 2.0)
    return {"cpu": model, "capability": capability, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "fp32_gflops": fp32, "bf16_gflops": bf16, "precision": resolve_precision("auto", torch.device("cpu"))}


def part_train_dealcl(sizes: dict) -> dict:
    from dealcl.methods import REGISTRY, Stage
    from dealcl.models.loading import load_model
    from dealcl.train.loop import CPU_MICRO_BATCH_TOKENS, TrainSettings, resolve_precision, train_stage

    precision = resolve_precision(os.environ.get("BENCH_PRECISION", "auto"), torch.device("cpu"))
    task = _task("agnews", sizes["train"], sizes["test"])
    loaded = load_model(MODEL)
    services = _services(loaded, precision, share_prefix=os.environ.get("BENCH_SHARE_PREFIX", "1") == "1")
    method = REGISTRY["seqlora"](REGISTRY["seqlora"].config_class(rank=8), services)
    model = method.prepare_model(loaded.model)
    stats = train_stage(model, method, Stage(1, task.name, [task]), [(task, e) for e in task.train],
                        TrainSettings(lr=5e-4, epochs=1, batch_size=8, seed=42, micro_batch_tokens=CPU_MICRO_BATCH_TOKENS),
                        services, progress=False)
    result = {"samples_per_s": stats["train_samples_per_second"], "seconds": stats["train_seconds"],
              "computed_tokens": stats["computed_tokens"], "answer_tokens": stats["answer_tokens"],
              "examples": len(task.train), "precision": precision, "peak_rss_mb": peak_rss_mb()}
    if os.environ.get("BENCH_SCORE", "1") == "1":
        result["exact_match"] = _exact_match(model, services, task)
    return result


def part_train_hf(sizes: dict) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from dealcl.models.loading import load_model
    from dealcl.train.loop import resolve_precision

    task = _task("agnews", sizes["train"], sizes["test"])
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


def part_eval(sizes: dict) -> dict:
    from transformers import GenerationConfig

    from dealcl.eval.generate import MAX_NEW_TOKENS, generate_answers
    from dealcl.eval.metrics import exact_match
    from dealcl.models.loading import load_model
    from dealcl.train.loop import resolve_precision

    task = _task("agnews", 8, sizes["eval"])
    loaded = load_model(MODEL)
    model, tokenizer = loaded.model, loaded.tokenizer
    sentences = [e.sentence for e in task.test]
    fp32 = _services(loaded, "fp32")
    fast = _services(loaded, resolve_precision("auto", torch.device("cpu")))

    # The plain path: one `generate` call per example, fp32, upstream's 50 new tokens.
    config = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=fp32.encoder.pad_id,
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


def part_methods(sizes: dict) -> dict:
    """One method's task-2 throughput and peak memory (task 1 untimed: DEAL's filter and MLP,
    O-LoRA's orthogonality and GORP's memory only act from task 2 on)."""
    from dealcl.methods import REGISTRY, Stage
    from dealcl.models.loading import load_model
    from dealcl.runs.config import method_config
    from dealcl.train.loop import CPU_MICRO_BATCH_TOKENS, TrainSettings, resolve_precision, train_stage

    # "deal:8" is deal at LoRA rank 8 (seqlora's rank), separating DEAL's own overhead from
    # the cost of its larger default rank (32 on LLaMA-family models).
    name, _, rank = os.environ["BENCH_METHOD"].partition(":")
    n_first, n_timed = sizes["methods"]
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
                            TrainSettings(lr=method_class.default_lr, epochs=1, batch_size=8, seed=42,
                                          micro_batch_tokens=CPU_MICRO_BATCH_TOKENS), services, progress=False)
        method.on_task_end(model, stage)
    return {"samples_per_s": stats["train_samples_per_second"], "trainable_parameters": stats["trainable_parameters"]}


def _longest_benchmark(root: Path, n_train: int, n_test: int) -> None:
    """A CL_Benchmark copy holding standard order 1's tasks with each task's `n_train` longest
    training examples (yahoo's and dbpedia's reach the 512-token prompt limit)."""
    from dealcl.data.loading import default_data_dir

    source = default_data_dir()
    root.mkdir(parents=True)
    shutil.copy(source / "instruction_config.json", root / "instruction_config.json")
    for group, name in STANDARD_ORDER_1:
        folder = root / group / name
        folder.mkdir(parents=True)
        shutil.copy(source / group / name / "labels.json", folder / "labels.json")
        train = json.loads((source / group / name / "train.json").read_text())
        test = json.loads((source / group / name / "test.json").read_text())
        (folder / "train.json").write_text(json.dumps(sorted(train, key=lambda r: -len(r["sentence"]))[:n_train]))
        (folder / "test.json").write_text(json.dumps(test[:n_test]))


def _cli_peak(args: list[str]) -> tuple[float, float]:
    """(peak RSS MB, seconds) of one `python -m dealcl ...` process. Its RSS is polled every
    20 ms: a run resets its own peak counter (VmHWM) at each stage to report per-stage peaks,
    which also resets what the kernel would report for the process at exit."""
    started, peak = time.perf_counter(), 0.0
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen([sys.executable, "-m", "dealcl", *args], stdout=subprocess.DEVNULL, stderr=errors)
        status = Path(f"/proc/{process.pid}/status")
        while process.poll() is None:
            try:
                fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
                peak = max(peak, int(fields.get("VmHWM", "0 kB").split()[0]) / 1024)
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        if process.returncode != 0:
            errors.seek(0)
            raise SystemExit(f"dealcl {' '.join(args)} failed:\n{errors.read().decode()[-2000:]}")
    return peak, time.perf_counter() - started


def measure_memory(sizes: dict, methods: tuple[str, ...]) -> dict:
    """Peak RSS of each method's whole run alone and of one comparison of all of them."""
    n_train, n_test = sizes["memory"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _longest_benchmark(root / "data", n_train, n_test)
        common = ["--benchmark", "standard", "--model", MODEL, "--data", str(root / "data"),
                  "--train-per-task", str(n_train), "--test-per-task", str(n_test), "--quiet"]
        single = {}
        for method in methods:
            peak, seconds = _cli_peak(["run", *common, "--order", "1", "--method", method, "--output", str(root / method)])
            stages = json.loads((root / method / "efficiency.json").read_text())["stages"]
            single[method] = {"peak_rss_mb": peak, "seconds": seconds,
                              "stage_peaks_mb": [s.get("peak_memory_mb") for s in stages]}
            say(f"memory: {method} alone: {peak:.0f} MB peak RSS, {seconds:.0f} s")
        if len(methods) < 2:
            return {"train_longest": n_train, "test": n_test, "single": single}
        peak, seconds = _cli_peak(["compare", *common, "--orders", "1", "--methods", ",".join(methods),
                                   "--output", str(root / "compare")])
        say(f"memory: compare of {len(methods)}: {peak:.0f} MB, {seconds:.0f} s")
    return {"train_longest": n_train, "test": n_test, "single": single,
            "compare": {"methods": list(methods), "peak_rss_mb": peak, "seconds": seconds}}


def part_scaling(sizes: dict) -> dict:
    from dealcl.runs.config import RunConfig
    from dealcl.runs.driver import run_continual

    benchmark, order = os.environ["BENCH_BENCHMARK"], os.environ.get("BENCH_ORDER")
    n_train, n_test = sizes["scaling"]
    with tempfile.TemporaryDirectory() as tmp:
        config = RunConfig(method="seqlora", model=MODEL, benchmark=benchmark, order=int(order) if order else None,
                           train_per_task=n_train, test_per_task=n_test)
        started = time.perf_counter()
        run_continual(config, Path(tmp) / "run", progress=False)
        total = time.perf_counter() - started
        stages = json.loads((Path(tmp) / "run" / "efficiency.json").read_text())["stages"]
    return {"tasks": len(stages), "total_s": total, "train_s": sum(s["train_seconds"] for s in stages),
            "eval_s": sum(s["eval_seconds"] for s in stages), "eval_examples": sum(s["eval_examples"] for s in stages)}


def part_demo_probe(sizes: dict) -> dict:
    from dealcl.data.benchmarks import resolve_sequence
    from dealcl.models.loading import load_model
    from dealcl.runs.demo import BUDGET_SECONDS, choose_caps, probe, task_sizes

    tasks = resolve_sequence("tc", None, None)
    sizes_of = task_sizes(tasks)
    started = time.perf_counter()
    loaded = load_model(MODEL)
    train_cost, answer_cost, precision = probe(loaded, tasks[0])
    probe_seconds = time.perf_counter() - started
    train, test, expected = choose_caps(tasks, sizes_of, (train_cost, answer_cost), BUDGET_SECONDS[precision])
    return {"train_cost_s": train_cost, "answer_cost_s": answer_cost, "precision": precision, "caps": [train, test],
            "expected_runs_s": expected, "load_and_probe_s": probe_seconds}


# ---- the driver --------------------------------------------------------------------------------
def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Rows:
    """Result rows, printed as each is measured (a long run keeps what it has) and at the end
    as one table; the raw measurements go to --json after every row."""

    WIDTH = 44

    def __init__(self, json_path: Path | None, measured: dict) -> None:
        self.rows: list[tuple[str, str, str, str]] = []
        self.json_path, self.measured = json_path, measured
        print(f"{'measure':<{self.WIDTH}}  {'dealcl':>18}  {'baseline':>18}  ratio", flush=True)

    def append(self, what: str, ours: str, base: str, ratio: str) -> None:
        self.rows.append((what, ours, base, ratio))
        print(self._line(self.rows[-1]), flush=True)
        if self.json_path:
            self.json_path.write_text(json.dumps(self.measured, indent=2))

    def _line(self, row) -> str:
        what, ours, base, ratio = row
        return f"{what:<{self.WIDTH}}  {ours:>18}  {base:>18}  {ratio}"

    def table(self, header: str) -> None:
        print(f"\n== summary ({header}) ==")
        for row in self.rows:
            print(self._line(row))


PART_SECONDS: dict[str, float] = {}


def _subprocess(part: str, sizes: dict, env: dict[str, str] | None = None) -> dict:
    started = time.perf_counter()
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, __file__, "--run-part", part, "--part-output", out.name, "--sizes", json.dumps(sizes)]
        done = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"part {part} failed:\n{done.stderr[-3000:]}")
        result = json.loads(Path(out.name).read_text())
    PART_SECONDS[part] = PART_SECONDS.get(part, 0.0) + time.perf_counter() - started
    return result


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", help=f"comma-separated, of {','.join(PARTS)} (default: all; --quick: all but methods)")
    parser.add_argument("--quick", action="store_true", help="smallest sizes: a smoke test of the script, not a measurement")
    parser.add_argument("--full-demo", action="store_true", help="also run `dealcl demo` (minutes) for its wall time and peak")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--methods", default="seqlora,deal:8,gorp",
                        help="methods at their defaults; NAME:R forces LoRA rank R (seqlora's default is 8)")
    parser.add_argument("--run-part", help=argparse.SUPPRESS)
    parser.add_argument("--part-output", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.run_part:
        sizes = json.loads(args.sizes)
        result = {
            "host": part_host,
            "train-dealcl": lambda: part_train_dealcl(sizes),
            "train-hf": lambda: part_train_hf(sizes),
            "eval": lambda: part_eval(sizes),
            "methods": lambda: part_methods(sizes),
            "scaling": lambda: part_scaling(sizes),
            "demo-probe": lambda: part_demo_probe(sizes),
        }[args.run_part]()
        Path(args.part_output).write_text(json.dumps(result))
        return 0

    started = time.perf_counter()
    parts = [p for p in args.parts.split(",") if p] if args.parts else [p for p in PARTS if not (args.quick and p == "methods")]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"error: unknown part(s) {', '.join(unknown)}; parts are {', '.join(PARTS)}", file=sys.stderr)
        return 2
    say("host: measuring the fp32 and bf16 matmul rates …")
    host = _subprocess("host", {})
    used_rate = host["bf16_gflops"] if host["precision"] == "bf16" else host["fp32_gflops"]
    scale = min(1.0, used_rate / REFERENCE_GFLOPS)
    sizes = sizes_for(scale, args.quick)
    header = (f"host: {host['cpu']}, {host['capability']}, {host['threads']} threads, torch {host['torch']}; "
              f"matmul 2048² fp32 {host['fp32_gflops']:.0f} GFLOP/s, bf16 {host['bf16_gflops']:.1f} GFLOP/s; "
              f"dealcl trains in {host['precision']} here")
    print(header, flush=True)
    print(f"sizes scaled by {scale:.2f} to this host's {host['precision']} rate{' (--quick)' if args.quick else ''}: "
          f"{json.dumps(sizes)}", flush=True)
    measured: dict = {"host": host, "scale": scale, "sizes": sizes}
    rows = Rows(args.json, measured)
    rate_of = {"fp32": host["fp32_gflops"] * 1e9, "bf16": host["bf16_gflops"] * 1e9}

    if "train" in parts or "prefix" in parts:
        say(f"train: dealcl loop ({host['precision']}) …")
        ours = measured["train_dealcl"] = _subprocess("train-dealcl", sizes)
    if "train" in parts:
        say("train: transformers.Trainer + PEFT, fp32 …")
        hf = measured["train_hf"] = _subprocess("train-hf", sizes)
        fp32 = ours
        if host["precision"] != "fp32":
            say("train: dealcl loop, fp32 (the path of a host without bf16 units) …")
            fp32 = measured["train_dealcl_fp32"] = _subprocess("train-dealcl", sizes, {"BENCH_PRECISION": "fp32"})
        n = ours["examples"]
        runs = [ours] if fp32 is ours else [ours, fp32]
        for run in runs:
            ratio = run["samples_per_s"] / hf["samples_per_s"]
            rows.append(f"train ex/s, dealcl {run['precision']} vs Trainer fp32 ({n} ex)", f"{run['samples_per_s']:.2f}",
                        f"{hf['samples_per_s']:.2f}", f"{ratio:.2f}x  (target >= 3x: {_met(ratio >= 3)})")
        for run in runs:
            flops = training_flops(run["computed_tokens"], run["answer_tokens"], run["computed_tokens"] / n)
            rate, peak = flops / run["seconds"], rate_of[run["precision"]]
            rows.append(f"training FLOP/s / {run['precision']} matmul rate", f"{rate / 1e9:.1f} GFLOP/s",
                        f"{peak / 1e9:.1f} GFLOP/s", f"{rate / peak:.0%}  (target >= 50%: {_met(rate >= 0.5 * peak)})")
        rows.append("held-out EM after 1 epoch (agnews)", f"{ours['exact_match']:.1f}", f"{hf['exact_match']:.1f}",
                    f"{ours['exact_match'] - hf['exact_match']:+.1f} pts  (target: not lower by more than 3)")
    if "prefix" in parts:
        say("prefix: dealcl loop without the shared prompt prefix …")
        whole = measured["train_no_prefix"] = _subprocess("train-dealcl", sizes, {"BENCH_SHARE_PREFIX": "0", "BENCH_SCORE": "0"})
        rows.append("shared prefix: train ex/s on / off", f"{ours['samples_per_s']:.2f}", f"{whole['samples_per_s']:.2f}",
                    f"{ours['samples_per_s'] / whole['samples_per_s']:.2f}x  "
                    f"(tokens computed {ours['computed_tokens'] / whole['computed_tokens']:.0%} of unshared)")
    if "eval" in parts:
        say("eval: per-example fp32 generate vs dealcl evaluator …")
        ev = measured["eval"] = _subprocess("eval", sizes)
        rows.append(f"eval s/example ({ev['n']} agnews)", f"{ev['dealcl_per_example_s']:.3f}",
                    f"{ev['plain_per_example_fp32_s']:.3f}", f"{ev['speedup']:.2f}x  (target >= 3x: {_met(ev['speedup'] >= 3)})")
        rows.append("batched = per-example, same dtype", f"{ev['same_as_single_same_dtype']:.0%}", "", f"({ev['precision']})")
        rows.append("fp32 batched decisions = plain generate", f"{ev['fp32_batched_same_as_plain']:.0%}", "", "")
    if "memory" in parts:
        methods = memory_methods(scale, args.quick)
        started_memory = time.perf_counter()
        mem = measured["memory"] = measure_memory(sizes, methods)
        PART_SECONDS["memory"] = time.perf_counter() - started_memory
        for method, single in mem["single"].items():
            peak = single["peak_rss_mb"]
            rows.append(f"peak RSS MB, {method}, order 1 (longest prompts)", f"{peak:.0f}", "3072",
                        f"{peak / 3072:.2f}x of 3 GB  (target <= 1: {_met(peak <= 3072)})")
        largest = max(s["peak_rss_mb"] for s in mem["single"].values())
        if "compare" in mem:
            ratio = mem["compare"]["peak_rss_mb"] / largest
            rows.append(f"peak RSS MB, compare of {len(methods)} vs largest single", f"{mem['compare']['peak_rss_mb']:.0f}",
                        f"{largest:.0f}", f"{ratio:.2f}x  (target <= 1.25x: {_met(ratio <= 1.25)})")
        else:
            why = "--quick" if args.quick else "too slow a host for it inside 20 min"
            rows.append("peak RSS MB, compare", "", "", f"not measured ({why})")
    if "methods" in parts:
        methods = [m for m in args.methods.split(",") if m]
        if args.quick:
            methods = methods[:2]
        results = {}
        for name in methods:
            say(f"methods: {name} …")
            results[name] = _subprocess("methods", sizes, {"BENCH_METHOD": name})
        measured["methods"] = results
        base = results.get("seqlora")
        for name, r in results.items():
            if name == "seqlora" or base is None:
                continue
            label = name.replace(":", " r") if ":" in name else f"{name} (default rank)"
            target = "  (target >= 0.9x)" if name.startswith("deal:") else ""  # DEAL vs LoRA at the same rank
            rows.append(f"{label} vs seqlora: train ex/s", f"{r['samples_per_s']:.2f}", f"{base['samples_per_s']:.2f}",
                        f"{r['samples_per_s'] / base['samples_per_s']:.2f}x{target}")
    if "demo" in parts:
        say("demo: the probe `dealcl demo` starts with …")
        demo = measured["demo_probe"] = _subprocess("demo-probe", sizes)
        total = demo["expected_runs_s"] + demo["load_and_probe_s"]
        limit = 300 if host["precision"] == "bf16" else 600
        rows.append("demo: expected minutes (probe + runs)", f"{total / 60:.1f}", f"{limit / 60:.0f}",
                    f"caps {demo['caps'][0]}/{demo['caps'][1]} per task  (target: {_met(total <= limit)})")
        if args.full_demo:
            say("demo: running `dealcl demo` …")
            with tempfile.TemporaryDirectory() as tmp:
                peak, seconds = _cli_peak(["demo", "--output", str(Path(tmp) / "demo")])
            measured["demo"] = {"peak_rss_mb": peak, "seconds": seconds}
            rows.append("demo: wall minutes / peak RSS MB", f"{seconds / 60:.1f}", f"{peak:.0f}",
                        f"(targets: <= {limit / 60:.0f} min {_met(seconds <= limit)}, <= 3072 MB {_met(peak <= 3072)})")
    if "scaling" in parts:
        say("scaling: 3 tasks …")
        three = _subprocess("scaling", sizes, {"BENCH_BENCHMARK": "tc"})
        measured["scaling"] = {"3": three}
        if not args.quick and scale >= 0.25:  # 15 tasks evaluate 120 task test sets: minutes on a slow host
            say("scaling: 15 tasks …")
            measured["scaling"]["15"] = _subprocess("scaling", sizes, {"BENCH_BENCHMARK": "long", "BENCH_ORDER": "4"})
        for r in measured["scaling"].values():
            rows.append(f"{r['tasks']}-task run: total s (eval share)", f"{r['total_s']:.0f}",
                        f"{r['eval_s'] / r['total_s']:.0%}", f"{r['eval_examples']} eval examples")
        if "15" in measured["scaling"]:
            rows.append("15 vs 3 tasks: total time", "", "", f"{measured['scaling']['15']['total_s'] / three['total_s']:.1f}x")

    measured["part_seconds"] = PART_SECONDS
    rows.table(header)
    print("seconds per part: " + ", ".join(f"{k} {v:.0f}" for k, v in PART_SECONDS.items()))
    print(f"bench/speed.py took {(time.perf_counter() - started) / 60:.1f} min (target < 20, --quick < 3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
