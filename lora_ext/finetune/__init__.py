"""`python -m lora_ext finetune`: LoRA/QLoRA fine-tuning of a causal LM. With no arguments it runs
fully offline: a small Llama built from a config, a byte-level tokenizer, the built-in corpus."""
