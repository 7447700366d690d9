"""transformers.Trainer checkpoints that hold a lora_ext model's adapters in PEFT's format, as Trainer writes them
for a PEFT model. Trainer saves adapters only for PEFT's own classes; for any other model it writes the whole
state dict (the frozen base in every checkpoint, and an error from safetensors where embeddings are tied).

    trainer = lora_ext.LoraTrainer(model=lora_model, args=..., train_dataset=...)   # a transformers.Trainer
    class MySFTTrainer(lora_ext.AdapterCheckpoints, trl.SFTTrainer): ...            # any Trainer subclass
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .model import LoraModel


class AdapterCheckpoints:
    """A mixin before a transformers.Trainer class: save and resume a LoraModel's adapters (save_pretrained /
    load_adapter with is_trainable=True); any other model as the Trainer does."""

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        if not isinstance(self.model, LoraModel):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self.model.save_pretrained(output_dir)  # (every rank: a sharded model gathers its tensors collectively)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.model if model is None else model
        if not isinstance(model, LoraModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name in model.peft_config:  # save_pretrained's layout: "default" at the top, others in their folders
            directory = os.path.join(resume_from_checkpoint, "" if name == "default" else name)
            model.load_adapter(directory, name, is_trainable=name == model.active_adapter)


def __getattr__(name: str):
    if name == "LoraTrainer":  # built on first use: transformers is imported only by those who train with it
        import transformers

        cls = type("LoraTrainer", (AdapterCheckpoints, transformers.Trainer),
                   {"__module__": __name__, "__doc__": "transformers.Trainer with AdapterCheckpoints."})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
