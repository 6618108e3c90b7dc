"""Prompts: the upstream template (template.py) and the encoder that turns examples into ids
(encoder.py). Training (train/) and evaluation (eval/) both read prompts from here."""
from .encoder import MIN_SHARED_PREFIX, EncodedExample, PromptEncoder, common_prefix_length
from .template import ANSWER_CUE, chat_wrap, fit_prompt, format_prompt

__all__ = ["ANSWER_CUE", "MIN_SHARED_PREFIX", "common_prefix_length", "EncodedExample", "PromptEncoder", "chat_wrap", "fit_prompt", "format_prompt"]
