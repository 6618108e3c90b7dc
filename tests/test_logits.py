"""Training logits come from the model's own forward: a head that transforms the projection
(Gemma-2's final soft-capping) must train on the logits it generates with."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Gemma2Config, Gemma2ForCausalLM

from dealcl.data.types import Example, Task
from dealcl.models.tiny import VOCAB_SIZE, byte_tokenizer, tiny_llama
from dealcl.prompts import PromptEncoder
from dealcl.train.batching import collate_train
from dealcl.train.services import TrainingServices, mask_answer_logits, union_answer_logits


def tiny_gemma2(cap: float):
    config = Gemma2Config(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, pad_token_id=0, eos_token_id=1,
        bos_token_id=None, final_logit_softcapping=cap, attn_implementation="eager",
    )
    torch.manual_seed(0)
    return Gemma2ForCausalLM(config).eval(), byte_tokenizer(append_eos=False)


def _batch(tokenizer):
    task = Task("toyA", "TC", "What is the topic? Choose one from the option.\n", ["apple", "plum"], [], [])
    encoder = PromptEncoder(tokenizer, "causal", 256)
    examples = [Example("the red apple", "apple"), Example("a plum", "plum"), Example("two big cats and one plum", "plum")]
    encoded = [encoder.encode(task, e.sentence, e.label) for e in examples]
    return encoder, collate_train(encoded, "causal", encoder.pad_id)


@pytest.mark.parametrize("build", [tiny_llama, lambda: tiny_gemma2(cap=0.5)], ids=["llama", "gemma2-softcapped"])
def test_answer_logits_equal_the_models_own_logits(build):
    model, tokenizer = build()
    encoder, batch = _batch(tokenizer)
    services = TrainingServices(encoder, "causal", "fp32", torch.device("cpu"))
    rows, positions = batch["target_rows"], batch["target_positions"]
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[rows, positions]
        ours = services.answer_logits(model, batch)
        union = union_answer_logits(model, batch["input_ids"], batch["attention_mask"], rows, positions)
        masked = mask_answer_logits(model, batch["input_ids"], batch["attention_mask"], rows, positions)
    assert services._mask_logits is True  # this transformers takes a mask: the head runs on answer positions only
    for logits in (ours, union, masked):
        torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-6)
    loss_sum, _ = services.task_loss_sum(model, batch)
    torch.testing.assert_close(loss_sum, F.cross_entropy(full, batch["target_ids"], reduction="sum"), rtol=1e-5, atol=1e-5)


def test_soft_capping_is_applied_in_training():
    """The projection alone (what dealcl used to train on) is not the capped logits."""
    model, tokenizer = tiny_gemma2(cap=0.5)
    _, batch = _batch(tokenizer)
    services = TrainingServices(PromptEncoder(tokenizer, "causal", 256), "causal", "fp32", torch.device("cpu"))
    with torch.no_grad():
        ours = services.answer_logits(model, batch)
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        raw = model.lm_head(hidden[batch["target_rows"], batch["target_positions"]])
    assert ours.abs().max() <= 0.5 and raw.abs().max() > 0.5
    torch.testing.assert_close(ours, 0.5 * torch.tanh(raw / 0.5), rtol=1e-5, atol=1e-6)


def test_targets_out_of_row_order_are_refused():
    model, tokenizer = tiny_llama()
    _, batch = _batch(tokenizer)
    rows, positions = batch["target_rows"].flip(0), batch["target_positions"].flip(0)
    with pytest.raises(ValueError, match="row by row"):
        mask_answer_logits(model, batch["input_ids"], batch["attention_mask"], rows, positions)
