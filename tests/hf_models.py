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


def llama_classifier(seed=0, num_labels=3):
    """LlamaForSequenceClassification: its head is `score`."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      num_labels=num_labels, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(config).eval()


def t5(seed=0):
    """An encoder-decoder whose paths hold two numbers (decoder.block.1.layer.0.SelfAttention.q)."""
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                   num_heads=4)
    return transformers.T5ForConditionalGeneration(config).eval()
