"""The upstream prompt (O-LoRA / DEAL / GORP), and fitting it into a token budget.

Upstream cuts over-long prompts from the right, which drops the `Answer:` cue and the end of
the example (deal_spec.md §2.3). Here only the sentence is shortened, so the task prefix,
instruction, options and cue always survive.
"""
from __future__ import annotations

from ..data.types import Task
from ..errors import UserError

ANSWER_CUE = "\nAnswer:"


def format_prompt(task: Task, sentence: str) -> str:
    """The upstream source text for one example, byte for byte.

    deal_spec.md §2.3 (upstream `src/uie_dataset_lora.py`, `src/uie_collator.py:53-80`):
    `Task:<type>\\nDataset:<name>\\n` + instruction + `Option: ` + labels joined by `, ` + ` \\n`
    (a space before the newline) + sentence + `\\nAnswer:`. COPA is the exception: after the
    prefix comes only sentence + `\\nAnswer:` (its sentence already holds the question and the
    A/B options).
    """
    prefix = f"Task:{task.task_type}\nDataset:{task.name}\n"
    if task.task_type == "COPA":
        return prefix + sentence + ANSWER_CUE
    return prefix + task.instruction + "Option: " + ", ".join(task.labels) + " \n" + sentence + ANSWER_CUE


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=True)["input_ids"])


def fit_prompt(task: Task, sentence: str, tokenizer, max_tokens: int) -> str:
    """The prompt, with the sentence cut token-wise from the right until it fits `max_tokens`.

    Token counts include the tokenizer's special tokens, as the model will see them. Decoding a
    token prefix and re-tokenizing can merge differently at the cut, so the result is re-checked
    and shrunk until it fits. The common case (it fits) costs one tokenization.
    """
    prompt = format_prompt(task, sentence)
    length = _count(tokenizer, prompt)
    if length <= max_tokens:
        return prompt
    empty = format_prompt(task, "")
    overhead = _count(tokenizer, empty)
    if overhead > max_tokens:
        raise UserError(
            f"task {task.name!r}: the prompt without its sentence already has {overhead} tokens, "
            f"more than max_tokens={max_tokens}; raise max_source_length"
        )
    ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
    keep = min(len(ids), max_tokens - overhead)
    while keep > 0:
        text = tokenizer.decode(ids[:keep], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        text = text.rstrip("\ufffd")  # a byte-level cut can split a UTF-8 character
        prompt = format_prompt(task, text)
        length = _count(tokenizer, prompt)
        if length <= max_tokens:
            return prompt
        keep -= max(1, length - max_tokens)
    return empty


def chat_wrap(prompt: str, tokenizer) -> str:
    """The prompt as a single user turn of the tokenizer's chat template, ready for the answer."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise UserError(f"tokenizer {name} has no chat template; use prompt_style plain")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
