"""Small Hugging Face models built from configs (nothing downloaded), shared by the model tests."""
import torch
import transformers


def llama(seed=0, **overrides):
    kwargs = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()


def token_ids():
    return torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(5))


def randomize_adapters(model):
    with torch.no_grad():
        for layer in model.lora_layers().values():
            layer.lora_B.normal_(0, 0.05)
