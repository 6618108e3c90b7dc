"""Exact match equals upstream's: 50 new tokens, normalised, compared with the label.

The early stop (a row ends once no label can still match) must give the same exact-match and
invalid-output decision for every example as plain generation of 50 tokens.
"""
from __future__ import annotations

import os

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from conftest import CL_BENCHMARK
from dealcl.data.loading import load_task
from dealcl.eval.generate import MAX_NEW_TOKENS, can_still_match, generate_answers
from dealcl.eval.metrics import exact_match, normalize_answer
from dealcl.models.loading import load_model
from dealcl.prompts import PromptEncoder

FP32 = dict(device=torch.device("cpu"), autocast=lambda: torch.autocast("cpu", enabled=False), progress=False)


@pytest.mark.parametrize("text, can", [
    ("", True), ("  ", True), ("G", True), ("Goo", True), ("Good", True), ("Good.", True), ("  GOOD!! ", True),
    ("Good\n\n", True), ("Good mo", False), ("Gx", False), ("Good. I", False), ("Bad", True), ("Ba d", False),
    ("Go\ufffd", True),  # the half-decoded character may still complete a label byte sequence
])
def test_can_still_match(text, can):
    assert can_still_match(text, [normalize_answer(label) for label in ("Good", "Bad")]) is can


def test_a_label_prefix_of_a_longer_label_keeps_going():
    labels = [normalize_answer(label) for label in ("Science or Technology", "Sports")]
    assert can_still_match("Science or", labels) and can_still_match("sports", labels)
    assert not can_still_match("Science and", labels) and not can_still_match("Sportsman", labels)


class ForcedContinuation(torch.nn.Module):
    """A real tiny model whose generation is forced to a token script chosen per prompt (then
    EOS once the script ends), so that every case of the rule can be driven on purpose."""

    def __init__(self, inner: torch.nn.Module, script_for, eos: int):
        super().__init__()
        self.inner, self.config, self.script_for, self.eos = inner, inner.config, script_for, eos

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    def generate(self, **kwargs):
        width = kwargs["input_ids"].shape[1]
        scripts = [self.script_for(row.tolist()) for row in kwargs["input_ids"]]
        eos = self.eos

        class Force(LogitsProcessor):
            def __call__(self, input_ids, scores):
                step = input_ids.shape[1] - width
                forced = torch.full_like(scores, -float("inf"))
                for row, script in enumerate(scripts):
                    forced[row, script[step] if step < len(script) else eos] = 0.0
                return forced

        return self.inner.generate(**kwargs, logits_processor=LogitsProcessorList([Force()]))


CONTINUATIONS = [
    " Good", " Good.", " Good. \n\n  ", " Good movie, I liked it", " Good. and more", " Good... and more", " Bad" + " " * 70,
    " Goo", " G ood", " bad!!", " Badly", " Good Bad", "", " " + "Good " * 20, " Bad\n\nBad",
]


def test_the_rule_decides_every_example_like_fifty_tokens(toy_data):
    loaded = load_model("tiny-llama")
    task = load_task("toyB", toy_data)
    encoder = PromptEncoder(loaded.tokenizer, "causal")
    tokenizer = loaded.tokenizer
    # One sentence per scripted continuation; a (left-padded) prompt's tail tells its case.
    sentences = [f"case {i} " + "word " * (i % 3) for i in range(len(CONTINUATIONS))]
    prompts = [encoder.prompt_ids(task, s) for s in sentences]
    scripts = [tokenizer(text, add_special_tokens=False).input_ids for text in CONTINUATIONS]

    def script_for(ids: list[int]) -> list[int]:
        (case,) = [i for i, p in enumerate(prompts) if ids[-len(p):] == p]
        return scripts[case]

    model = ForcedContinuation(loaded.model, script_for, encoder.eos_id)
    common = dict(arch="causal", batch_size=4, share_prefix=False, **FP32)
    early, _ = generate_answers(model, encoder, task, sentences, **common)
    full, _ = generate_answers(model, encoder, task, sentences, stop_without_label=False, **common)
    for text, e, f in zip(CONTINUATIONS, early, full):
        for label in task.labels:
            assert exact_match(e, label) == exact_match(f, label), (text, e, f)
    # Plain generation runs to 50 tokens; the rule stopped at the first character that no
    # label continues with.
    assert full[CONTINUATIONS.index(" Bad" + " " * 70)] == "Bad"
    assert len(tokenizer(" Bad" + " " * 70).input_ids) > MAX_NEW_TOKENS
    assert full[CONTINUATIONS.index(" Good movie, I liked it")] == "Good movie, I liked it"
    assert early[CONTINUATIONS.index(" Good movie, I liked it")] == "Good m"
    # Upstream's decisions, which the old "longest label + 3 tokens" cap got wrong.
    assert not exact_match(early[CONTINUATIONS.index(" Good... and more")], "Good")
    assert exact_match(early[CONTINUATIONS.index(" Bad" + " " * 70)], "Bad")
    assert not exact_match(early[CONTINUATIONS.index(" " + "Good " * 20)], "Good")


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-t5"])
def test_a_model_that_runs_on_gets_the_same_decisions(toy_data, model_name):
    """Random tiny models never stop by themselves (EOS suppressed): every answer runs on."""
    loaded = load_model(model_name)
    task = load_task("toyC", toy_data)
    encoder = PromptEncoder(loaded.tokenizer, loaded.arch)
    loaded.model.generation_config.suppress_tokens = [encoder.eos_id]
    sentences = [e.sentence for e in task.test]
    common = dict(arch=loaded.arch, batch_size=8, **FP32)
    early, _ = generate_answers(loaded.model, encoder, task, sentences, **common)
    full, _ = generate_answers(loaded.model, encoder, task, sentences, stop_without_label=False, **common)
    assert [[exact_match(a, label) for label in task.labels] for a in early] == \
           [[exact_match(a, label) for label in task.labels] for a in full]
    assert all(f.startswith(e) for e, f in zip(early, full))


@pytest.mark.skipif(not (CL_BENCHMARK / "TC" / "agnews").is_dir() or os.environ.get("DEALCL_SKIP_SMOLLM2"),
                    reason="needs ../shared/CL_Benchmark")
def test_smollm2_zero_shot_decisions_equal_fifty_tokens():
    loaded = load_model("smollm2-135m")
    for name in ("agnews", "SST-2"):
        task = load_task(name, CL_BENCHMARK, test_per_task=12)
        encoder = PromptEncoder(loaded.tokenizer, "causal")
        sentences = [e.sentence for e in task.test]
        common = dict(arch="causal", batch_size=12, **FP32)
        early, _ = generate_answers(loaded.model, encoder, task, sentences, **common)
        full, _ = generate_answers(loaded.model, encoder, task, sentences, stop_without_label=False, **common)
        for e, f in zip(early, full):
            assert [exact_match(e, label) for label in task.labels] == [exact_match(f, label) for label in task.labels]


def test_an_unfinished_run_scored_by_another_rule_is_not_continued(toy_data, tmp_path):
    import shutil

    import yaml

    from conftest import tiny_run_config
    from dealcl.errors import UserError
    from dealcl.eval.evaluator import OLD_ANSWER_RULE
    from dealcl.runs.driver import run_continual

    out = tmp_path / "run"
    config = tiny_run_config(toy_data)
    run_continual(config, out, progress=False)
    recorded = yaml.safe_load((out / "run.yaml").read_text())
    assert recorded["effective"]["answer_rule"].startswith("greedy, 50 new tokens")
    # A run from before the rule (no answer_rule recorded), killed before its last stage.
    del recorded["effective"]["answer_rule"]
    (out / "run.yaml").write_text(yaml.safe_dump(recorded))
    finished = (out / "results.json").read_bytes()
    assert run_continual(config, out, progress=False)  # finished: re-read, nothing scored again
    assert (out / "results.json").read_bytes() == finished
    shutil.rmtree(out / "outputs" / "2-toyB")
    with pytest.raises(UserError, match="another answer rule") as error:
        run_continual(config, out, progress=False)
    assert OLD_ANSWER_RULE in str(error.value)
