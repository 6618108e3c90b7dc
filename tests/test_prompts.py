"""Prompts: golden strings written by hand from deal_spec.md §2.3, and token-budget fitting."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dealcl.data.loading import load_task
from dealcl.data.types import Task
from dealcl.errors import UserError
from dealcl.prompts import chat_wrap, fit_prompt, format_prompt

DATA = Path(__file__).resolve().parents[2] / "shared" / "CL_Benchmark"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared CL_Benchmark not present")


def first_test_task(name: str) -> Task:
    return load_task(name, DATA, test_per_task=1)


# --- golden prompts: the first test record of one dataset of each task type -------------------

GOLDEN = {
    "dbpedia": (
        "Task:TC\nDataset:dbpedia\n"
        "What is the topic of the following paragraph? Choose one from the option.\n"
        "Option: Company, Educational Institution, Artist, Athlete, Office Holder, Mean of Transportation, "
        "Building, Natural Place, Village, Animal, Plant, Album, Film, Written Work \n"
        "Title: William V. Brady\nText:  William Vermilye Brady (July 24 1811– March 31 1870) was the 68th "
        "Mayor of New York City from 1847 to 1848.\n"
        "\nAnswer:"
    ),
    "SST-2": (
        "Task:SC\nDataset:SST-2\n"
        "What is the sentiment of the following paragraph? Choose one from the option.\n"
        "Option: Good, Bad \n"
        "Text: stealing harvard aspires to comedic grand larceny but stands convicted of nothing more than "
        "petty theft of your time . "
        "\nAnswer:"
    ),
    "MNLI": (
        "Task:NLI\nDataset:MNLI\n"
        'What is the logical relationship between the "sentence 1" and the "sentence 2"? '
        "Choose one from the option.\n"
        "Option: neutral, entailment, contradiction \n"
        "sentence 1: right that's that's supposedly\nsentence 2: It is always possible.  "
        "\nAnswer:"
    ),
    "QQP": (
        "Task:QQP\nDataset:QQP\n"
        'Whether the "first sentence" and the "second sentence" have the same meaning? '
        "Choose one from the option.\n"
        "Option: False, True \n"
        "first sentence: What are the best franchises in India?\n"
        "second sentence: What are the best franchise in India?"
        "\nAnswer:"
    ),
    "WiC": (
        "Task:WiC\nDataset:WiC\n"
        "Given a word and two sentences, whether the word is used with the same sense in both sentence? "
        "Choose one from the option.\n"
        "Option: True, False \n"
        "word: class\nAn emerging professional class.\n"
        "Apologizing for losing your temper, even though you were badly provoked, showed real class."
        "\nAnswer:"
    ),
    # COPA: prefix, then only sentence + "\nAnswer:" (no instruction, no Option line).
    "COPA": (
        "Task:COPA\nDataset:COPA\n"
        'Which sentence is the effect of "The man turned on the faucet."? Choose one between A and B.\n'
        "A: The toilet filled with water.\nB: Water flowed from the spout."
        "\nAnswer:"
    ),
}

# BoolQA and MultiRC passages are ~1,000 characters: the template is written by hand, the
# sentence is the file's, checked by its opening words.
LONG_GOLDEN = {
    "BoolQA": (
        "Task:BoolQA\nDataset:BoolQA\n"
        "According to the following passage, is the question true or false? Choose one from the option.\n"
        "Option: True, False \n",
        "question: does ethanol take more energy make that produces\npassage: Ethanol fuel -- All biomass",
    ),
    "MultiRC": (
        "Task:MultiRC\nDataset:MultiRC\n"
        "According to the following passage and question, is the candidate answer true or false? "
        "Choose one from the option.\n"
        "Option: False, True \n",
        "paragraph: Light rays strike a reflecting surface.",
    ),
}


@needs_data
@pytest.mark.parametrize("name", list(GOLDEN))
def test_golden_prompt(name):
    task = first_test_task(name)
    assert format_prompt(task, task.test[0].sentence) == GOLDEN[name]


@needs_data
@pytest.mark.parametrize("name", list(LONG_GOLDEN))
def test_golden_prompt_long_passages(name):
    task = first_test_task(name)
    head, opening = LONG_GOLDEN[name]
    sentence = task.test[0].sentence
    assert sentence.startswith(opening)
    assert format_prompt(task, sentence) == head + sentence + "\nAnswer:"


def make_task(task_type: str = "TC", labels: list[str] | None = None, instruction: str = "Pick one.\n") -> Task:
    return Task(name="toy", task_type=task_type, instruction=instruction,
                labels=labels or ["World", "Sports"], train=[], test=[])


def test_format_prompt_template_pieces():
    task = make_task()
    assert format_prompt(task, "hello") == "Task:TC\nDataset:toy\nPick one.\nOption: World, Sports \nhello\nAnswer:"
    copa = make_task("COPA", ["A", "B"], instruction="ignored\n")
    assert format_prompt(copa, "Q?\nA: x\nB: y") == "Task:COPA\nDataset:toy\nQ?\nA: x\nB: y\nAnswer:"


def test_sentence_braces_are_kept_verbatim():
    # upstream fills "{0}" with str.format; the filled-in text itself is never re-parsed
    assert format_prompt(make_task(), "a {0} b {}").endswith("\na {0} b {}\nAnswer:")


# --- a byte-level tokenizer built in the test: one token per UTF-8 byte, plus </s> -------------

@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=True)["input_ids"])


def test_tokenizer_is_one_token_per_byte_plus_eos(tokenizer):
    assert n_tokens(tokenizer, "abc é") == len("abc é".encode()) + 1


def test_fit_prompt_short_sentence_is_untouched_with_one_tokenization(tokenizer):
    calls = []

    class Counting:
        def __call__(self, *args, **kwargs):
            calls.append(args)
            return tokenizer(*args, **kwargs)

    task = make_task()
    assert fit_prompt(task, "short", Counting(), 512) == format_prompt(task, "short")
    assert len(calls) == 1


def test_fit_prompt_truncates_only_the_sentence(tokenizer):
    task = make_task()
    sentence = "word " * 2000
    max_tokens = 100
    prompt = fit_prompt(task, sentence, tokenizer, max_tokens)
    head = "Task:TC\nDataset:toy\nPick one.\nOption: World, Sports \n"
    assert prompt.startswith(head) and prompt.endswith("\nAnswer:")
    assert "Option: World, Sports" in prompt
    kept = prompt[len(head):-len("\nAnswer:")]
    assert kept and sentence.startswith(kept)
    # byte-level: the cut is exact, so the prompt uses the whole budget and no more
    assert n_tokens(tokenizer, prompt) == max_tokens


def test_fit_prompt_does_not_leave_half_a_character(tokenizer):
    task = make_task()
    overhead = n_tokens(tokenizer, format_prompt(task, ""))
    prompt = fit_prompt(task, "é" * 500, tokenizer, overhead + 7)  # 7 bytes = 3.5 characters
    assert "\ufffd" not in prompt
    assert "\nééé\nAnswer:" in prompt
    assert n_tokens(tokenizer, prompt) <= overhead + 7


def test_fit_prompt_copa_keeps_the_cue(tokenizer):
    task = make_task("COPA", ["A", "B"], instruction="")
    prompt = fit_prompt(task, "x" * 1000, tokenizer, 60)
    assert prompt.endswith("x\nAnswer:") and n_tokens(tokenizer, prompt) == 60


def test_fit_prompt_budget_below_the_template_is_a_user_error(tokenizer):
    task = make_task()
    overhead = n_tokens(tokenizer, format_prompt(task, ""))
    assert fit_prompt(task, "long sentence", tokenizer, overhead) == format_prompt(task, "")
    with pytest.raises(UserError) as info:
        fit_prompt(task, "long sentence", tokenizer, overhead - 1)
    assert "'toy'" in str(info.value) and f"max_tokens={overhead - 1}" in str(info.value)


def test_chat_wrap_uses_the_template(tokenizer):
    import copy

    chatty = copy.deepcopy(tokenizer)
    chatty.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert chat_wrap("Task:TC\nx\nAnswer:", chatty) == "<user>Task:TC\nx\nAnswer:</user><assistant>"


def test_chat_wrap_without_template_is_a_user_error(tokenizer):
    with pytest.raises(UserError, match="no chat template"):
        chat_wrap("hi", tokenizer)
