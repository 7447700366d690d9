"""lora_ext.LoraTrainer (transformers.Trainer with AdapterCheckpoints): checkpoints hold the adapter in PEFT's
format, which PEFT reads, and a run resumed from one ends where the uninterrupted run ends."""
import os

import pytest
import torch

import lora_ext

from conftest import requires_c

pytestmark = requires_c
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_models import llama, token_ids  # noqa: E402


def _train(out, resume=None):
    """4 steps, a checkpoint every 2, of a model with tied embeddings (the whole state dict, which plain Trainer
    writes for a model it does not know, is refused by safetensors there)."""
    model = lora_ext.get_peft_model(llama(tie_word_embeddings=True), r=4, lora_alpha=8,
                                    target_modules=["q_proj", "v_proj"], modules_to_save=["norm"])
    pattern = torch.arange(16) % 12 + 3
    data = [{"input_ids": pattern.roll(i), "labels": pattern.roll(i)} for i in range(16)]
    args = transformers.TrainingArguments(output_dir=str(out), max_steps=4, save_steps=2, learning_rate=1e-2,
                                          per_device_train_batch_size=4, logging_steps=1, report_to=[],
                                          use_cpu=True, disable_tqdm=True)
    lora_ext.LoraTrainer(model=model, args=args, train_dataset=data).train(resume_from_checkpoint=resume)
    return model


def test_checkpoints_hold_the_adapter_and_a_resumed_run_ends_where_the_whole_run_ends(tmp_path):
    whole = _train(tmp_path / "whole")
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    files = set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= files
    assert "model.safetensors" not in files  # not the frozen base again
    ids = token_ids()
    with torch.no_grad():
        ours = lora_ext.LoraModel.from_pretrained(llama(tie_word_embeddings=True), str(checkpoint))
        theirs = peft.PeftModel.from_pretrained(llama(tie_word_embeddings=True), str(checkpoint)).eval()
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
    resumed = _train(tmp_path / "resumed", resume=str(checkpoint))
    expected = {k: v for k, v in whole.state_dict().items() if "lora_" in k or "modules_to_save" in k}
    got = resumed.state_dict()
    assert expected and all(torch.allclose(got[k], v, rtol=1e-5, atol=1e-7) for k, v in expected.items())
    assert not all(torch.equal(got[k], v) for k, v in lora_ext.get_peft_model(
        llama(tie_word_embeddings=True), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
        modules_to_save=["norm"]).state_dict().items() if k in expected)  # (trained: not the initial adapter)
