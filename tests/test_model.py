"""get_peft_model / LoraModel on real Hugging Face model classes built from small configs, with the
real PEFT package as the oracle for trainable counts, on-disk format and logits."""
import io
import os
from contextlib import redirect_stdout

import pytest
import torch

import lora_ext

from conftest import requires_c
from nf4_definition import dequantize_by_definition

pytestmark = requires_c
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_models import llama as _llama, randomize_adapters as _randomize_adapters, token_ids as _ids  # noqa: E402


def test_targets_freezing_and_trainable_line_match_peft():
    ours = lora_ext.get_peft_model(_llama(), r=8, lora_alpha=16)
    theirs = peft.get_peft_model(_llama(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=lora_ext.model.DEFAULT_TARGETS))
    assert len(ours.lora_layers()) == 2 * 7
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    a, b = io.StringIO(), io.StringIO()
    with redirect_stdout(a):
        ours.print_trainable_parameters()
    with redirect_stdout(b):
        theirs.print_trainable_parameters()
    assert a.getvalue() == b.getvalue()
    assert all(not p.requires_grad for n, p in ours.named_parameters() if "lora_" not in n)
    assert set(ours.state_dict()) >= {"base_model.model.model.layers.0.self_attn.q_proj.lora_A"}


def test_saved_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    ours = lora_ext.get_peft_model(_llama(), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    _randomize_adapters(ours)
    ours.save_pretrained(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(_llama(), str(tmp_path)).eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ours(ids).logits, _llama()(ids).logits, atol=1e-4)


@pytest.mark.parametrize("use_rslora, targets", [(False, ["q_proj", "o_proj"]), (True, r".*\.(k_proj|up_proj)")])
def test_peft_adapter_loads_here_with_the_same_logits(tmp_path, use_rslora, targets):
    theirs = peft.get_peft_model(_llama(), peft.LoraConfig(r=8, lora_alpha=4, target_modules=targets,
                                                           use_rslora=use_rslora, init_lora_weights=False))
    theirs.save_pretrained(str(tmp_path))
    ours = lora_ext.LoraModel.from_pretrained(_llama(), str(tmp_path))
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_disable_merge_and_unload():
    ours = lora_ext.get_peft_model(_llama(), r=4, lora_alpha=8)
    _randomize_adapters(ours)
    ids = _ids()
    base = _llama()(ids).logits
    with torch.no_grad():
        adapted = ours(ids).logits
        with ours.disable_adapter():
            torch.testing.assert_close(ours(ids).logits, base)
        merged = ours.merge_and_unload()
        assert not any(isinstance(m, lora_ext.LoraLinear) for m in merged.modules())
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-4, atol=1e-4)


def test_hot_swap_replaces_weights_in_place(tmp_path):
    a = lora_ext.get_peft_model(_llama(), r=4, lora_alpha=8)
    _randomize_adapters(a)
    a.save_pretrained(str(tmp_path / "a"))
    b = lora_ext.get_peft_model(_llama(), r=4, lora_alpha=8)
    ids = _ids()
    layer_ids = {n: id(m) for n, m in b.lora_layers().items()}
    b.load_adapter(str(tmp_path / "a"), "default")
    assert {n: id(m) for n, m in b.lora_layers().items()} == layer_ids
    with torch.no_grad():
        torch.testing.assert_close(b(ids).logits, a(ids).logits)


def test_qlora_injection_and_a_training_step():
    model = lora_ext.get_peft_model(_llama(), r=4, lora_alpha=8, quantize_base="nf4")
    nf4 = [m for m in model.modules() if isinstance(m, lora_ext.NF4Linear)]
    assert len(nf4) == 14 and not isinstance(model.get_output_embeddings(), lora_ext.NF4Linear)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids()
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_errors_name_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match=r"matches no Linear module; closest Linear names: .*q_proj"):
        lora_ext.get_peft_model(_llama(), target_modules=["q_prj"])
    model = lora_ext.get_peft_model(_llama(), r=4)
    with pytest.raises(ValueError, match="already has lora_ext adapters; use LoraModel.add_adapter"):
        lora_ext.get_peft_model(model.base_model.model)
    model.save_pretrained(str(tmp_path))
    with open(tmp_path / "adapter_model.safetensors", "wb") as f:
        f.write(b"not a safetensors file")
    fresh = _llama()
    before = [n for n, _ in fresh.named_modules()]
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a readable safetensors file"):
        lora_ext.LoraModel.from_pretrained(fresh, str(tmp_path))
    assert [n for n, _ in fresh.named_modules()] == before
    with pytest.raises(FileNotFoundError, match="adapter file not found"):
        lora_ext.LoraModel.from_pretrained(fresh, str(tmp_path / "nowhere"))


def test_shape_mismatch_names_the_key(tmp_path):
    lora_ext.get_peft_model(_llama(), r=4, target_modules=["q_proj"]).save_pretrained(str(tmp_path))
    cfg_path = os.path.join(tmp_path, "adapter_config.json")
    text = open(cfg_path).read().replace('"r": 4', '"r": 6')
    open(cfg_path, "w").write(text)
    fresh = _llama()
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight has shape \(4, 64\), the model needs \(6, 64\)"):
        lora_ext.LoraModel.from_pretrained(fresh, str(tmp_path))
    assert not any(isinstance(m, lora_ext.LoraLinear) for m in fresh.modules())


def test_two_adapters_switch_disable_hot_swap_merge(tmp_path):
    model = lora_ext.get_peft_model(_llama(), r=4, lora_alpha=8)
    _randomize_adapters(model)
    ids = _ids()
    with torch.no_grad():
        out_default = model(ids).logits
        base = _llama()(ids).logits
        model.add_adapter("second", r=8, lora_alpha=8, init_lora_weights=False)
        torch.testing.assert_close(model(ids).logits, out_default)  # adding does not activate
        model.set_adapter("second")
        out_second = model(ids).logits
        assert not torch.allclose(out_second, out_default, atol=1e-4)
        model.set_adapter("default")
        torch.testing.assert_close(model(ids).logits, out_default)
        with model.disable_adapter():
            torch.testing.assert_close(model(ids).logits, base)
        # Save both (PEFT layout: default at the root, the other in a subfolder) and hot swap.
        model.save_pretrained(str(tmp_path))
        assert os.path.isfile(tmp_path / "second" / "adapter_model.safetensors")
        other = lora_ext.get_peft_model(_llama(), r=4, lora_alpha=8)
        other.load_adapter(str(tmp_path / "second"), "second")
        other.set_adapter("second")
        torch.testing.assert_close(other(ids).logits, out_second)
        peft_second = peft.PeftModel.from_pretrained(_llama(), str(tmp_path / "second")).eval()
        torch.testing.assert_close(peft_second(ids).logits, out_second, rtol=1e-5, atol=1e-5)
        other.load_adapter(str(tmp_path), "default")  # hot swap of an inactive adapter
        other.set_adapter("default")
        torch.testing.assert_close(other(ids).logits, out_default)
        other.delete_adapter("second")
        assert sorted(other.peft_config) == ["default"]
        merged = other.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, out_default, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="is active; set_adapter to another one"):
        model.delete_adapter("default")
    with pytest.raises(KeyError, match="no adapter named 'third'"):
        model.set_adapter("third")


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma"])
def test_other_llama_like_families(family):
    cfg_cls = {"mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config,
               "gemma": transformers.GemmaConfig}[family]
    model_cls = {"mistral": transformers.MistralForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                 "gemma": transformers.GemmaForCausalLM}[family]
    kwargs = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if family == "gemma":
        kwargs["head_dim"] = 16
    torch.manual_seed(0)
    hf = model_cls(cfg_cls(**kwargs)).eval()
    torch.manual_seed(0)
    ref = model_cls(cfg_cls(**kwargs)).eval()
    for quantize in (None, "nf4"):
        model = lora_ext.get_peft_model(model_cls(cfg_cls(**kwargs)).eval() if quantize else hf, r=4, lora_alpha=8,
                                        quantize_base=quantize)
        assert len(model.lora_layers()) == 14
        ids = _ids()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(layer.lora_A.grad is not None for layer in model.lora_layers().values())
    with torch.no_grad():
        torch.testing.assert_close(hf(_ids()).logits, ref(_ids()).logits)  # B = 0: LoRA starts as the base


@pytest.mark.parametrize("reentrant, quantize", [(True, None), (False, "nf4")])
def test_bert_with_explicit_targets_and_gradient_checkpointing(reentrant, quantize):
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=112, max_position_embeddings=64)
    torch.manual_seed(0)
    model = lora_ext.get_peft_model(transformers.BertModel(cfg), r=4, lora_alpha=8, target_modules=["query", "value"],
                                    init_lora_weights=False, quantize_base=quantize)
    assert len(model.lora_layers()) == 4
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    model.train()
    out = model(input_ids=_ids()).last_hidden_state
    out.float().pow(2).mean().backward()
    assert all(layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0
               for layer in model.lora_layers().values())


def test_gpt2_conv1d_all_linear_with_peft_interop(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    model = lora_ext.get_peft_model(transformers.GPT2LMHeadModel(cfg).eval(), r=4, lora_alpha=8,
                                    target_modules="all-linear", init_lora_weights=False)
    names = sorted(model.lora_layers())
    assert len(names) == 2 * 4 and not any("lm_head" in n for n in names)  # c_attn, c_proj, c_fc, mlp.c_proj
    ids = _ids()
    with torch.no_grad():
        adapted = model(ids).logits
        model.save_pretrained(str(tmp_path))
        torch.manual_seed(0)
        theirs = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel(cfg).eval(), str(tmp_path)).eval()
        torch.testing.assert_close(theirs(ids).logits, adapted, rtol=1e-5, atol=1e-5)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-4, atol=1e-4)


def test_gpt2_qlora_quantizes_conv1d_as_the_linear_it_stands_for(tmp_path):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    model = lora_ext.get_peft_model(transformers.GPT2LMHeadModel(cfg).eval(), r=4, lora_alpha=8,
                                    target_modules="all-linear", init_lora_weights=False, quantize_base="nf4")
    assert all(isinstance(m.base_layer, lora_ext.NF4Linear) for m in model.lora_layers().values())
    # Oracle: dense GPT-2 whose Conv1D weights went through bitsandbytes' NF4 quantizer (decoded by the
    # format's definition), PEFT on top.
    torch.manual_seed(0)
    dense = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name in model.lora_layers():
            conv = dense.get_submodule(name)
            packed, state = bnb_functional.quantize_4bit(conv.weight.t().contiguous(), blocksize=64, quant_type="nf4",
                                                         compress_statistics=True)
            conv.weight.copy_(dequantize_by_definition(packed, state).t())
        model.save_pretrained(str(tmp_path))
        assert peft.LoraConfig.from_pretrained(str(tmp_path)).fan_in_fan_out
        theirs = peft.PeftModel.from_pretrained(dense, str(tmp_path)).eval()
        ids = _ids()
        adapted = model(ids).logits
        torch.testing.assert_close(adapted, theirs(ids).logits, rtol=1e-4, atol=1e-4)
        # Merged into dense weights, the model is a GPT-2 again: Conv1D layers that save and reload.
        model.merge_and_unload(dequantize=True).save_pretrained(str(tmp_path / "merged"))
        reloaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "merged")).eval()
        assert type(reloaded.transformer.h[0].attn.c_proj).__name__ == "Conv1D"
        torch.testing.assert_close(reloaded(ids).logits, adapted, rtol=1e-4, atol=1e-4)


_RELOAD = """
import sys, torch, transformers, lora_ext
cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
torch.manual_seed(0)
model = lora_ext.LoraModel.from_pretrained(transformers.LlamaForCausalLM(cfg).eval(), sys.argv[1], quantize_base="nf4")
ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(5))
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[2])
"""


def test_trainer_qlora_20_steps_then_reload_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    model = lora_ext.get_peft_model(_llama(), r=8, lora_alpha=16, quantize_base="nf4")
    pattern = torch.arange(16) % 12 + 3
    data = [{"input_ids": pattern.roll(i), "labels": pattern.roll(i)} for i in range(32)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=20, per_device_train_batch_size=8,
                                          learning_rate=2e-2, logging_steps=1, report_to=[], save_strategy="no",
                                          remove_unused_columns=False, use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 20 and sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses
    model.save_pretrained(str(tmp_path / "adapter"))
    model.eval()
    with torch.no_grad():
        expected = model(_ids()).logits
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "logits.pt"
    subprocess.run([sys.executable, "-c", _RELOAD, str(tmp_path / "adapter"), str(out)], check=True, cwd=root,
                   env=dict(os.environ, PYTHONPATH=root), timeout=300)
    torch.testing.assert_close(torch.load(out), expected, rtol=1e-5, atol=1e-5)


def test_lora_model_copies_and_forwards_attributes():
    import copy

    model = lora_ext.get_peft_model(_llama(), r=4, lora_alpha=8)
    assert model.config.hidden_size == 64  # forwarded to the Hugging Face model
    twin = copy.deepcopy(model)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, model(ids).logits)


def _peft_targets(peft_model):
    return sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer))


@pytest.mark.parametrize("targets, message", [
    (["q_proj", "mlp"], r"entry 'mlp' matches model.layers.0.mlp \(LlamaMLP\): it is not a layer but a block of "
                        r"them: name the Linear layers inside it; lora_ext supports Linear, NF4Linear and "
                        r"GPT-2 Conv1D"),
    (["q_proj", "embed_tokens"], r"entry 'embed_tokens' matches model.embed_tokens \(Embedding\): LoRA on embeddings"),
    (r".*\.(q_proj|embed_tokens)", r"entry '.*' matches model.embed_tokens \(Embedding\)"),
])
def test_targets_lora_ext_cannot_adapt_are_named_and_change_nothing(targets, message):
    """PEFT adapts embeddings and convolutions and refuses blocks (LlamaMLP); lora_ext refuses all three by name
    rather than leave out what PEFT would adapt."""
    if targets[-1] == "mlp":
        with pytest.raises(ValueError, match="Target module LlamaMLP"):
            peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=targets))
    model = _llama()
    before = {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="get_peft_model: target_modules " + message):
        lora_ext.get_peft_model(model, r=4, target_modules=targets)
    after = {n: (p.requires_grad, p.detach()) for n, p in model.named_parameters()}
    assert after.keys() == before.keys() and all(after[n][0] == g and torch.equal(after[n][1], v)
                                                 for n, (g, v) in before.items())
    assert not any(isinstance(m, lora_ext.LoraLinear) for m in model.modules())


def test_unadaptable_targets_in_files_and_other_models(tmp_path):
    # PEFT's adapter on the embedding: the load says why, naming the file
    peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"])).save_pretrained(
        str(tmp_path))
    fresh = _llama()
    with pytest.raises(ValueError, match=r"adapter_config.json: target_modules entry 'embed_tokens' matches "
                                         r"model.embed_tokens \(Embedding\): LoRA on embeddings"):
        lora_ext.LoraModel.from_pretrained(fresh, str(tmp_path))
    assert not any(isinstance(m, lora_ext.LoraLinear) for m in fresh.modules())
    # a convolution, in a model of one's own
    net = torch.nn.Sequential()
    net.add_module("conv", torch.nn.Conv2d(3, 4, 3))
    net.add_module("fc", torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"entry 'conv' matches conv \(Conv2d\): lora_ext adapts Linear"):
        lora_ext.get_peft_model(net, r=2, target_modules=["conv", "fc"])
    # "all-linear" leaves them out silently, as PEFT
    ours = lora_ext.get_peft_model(_llama(), r=4, target_modules="all-linear")
    assert sorted(ours.lora_layers()) == _peft_targets(peft.get_peft_model(_llama(), peft.LoraConfig(
        r=4, target_modules="all-linear")))


@pytest.mark.parametrize("make, storage, message", [
    (lambda: _llama(), torch.bfloat16, r"packed bytes cannot be viewed as torch.bfloat16"),
    (lambda: _llama().double(), torch.uint8, r"NF4 quantizes float32, float16 or bfloat16 weights, got torch.float64"),
])
def test_quantize_base_checks_every_layer_before_the_first_changes(make, storage, message):
    """A layer NF4 cannot hold (its packed bytes not a whole number of the storage dtype's; fp64) is refused
    before any layer is quantized or any parameter frozen."""
    model = make()
    with torch.no_grad():  # one odd-sized layer, after layers that would quantize
        model.model.layers[-1].mlp.down_proj = torch.nn.Linear(3, 3, dtype=model.dtype)  # 5 packed bytes
    before = {n: (p.requires_grad, type(m).__name__) for n, p in model.named_parameters()
              for m in [model.get_submodule(n.rpartition(".")[0])]}
    with pytest.raises((ValueError, TypeError), match=message):
        lora_ext.get_peft_model(model, r=4, target_modules=["q_proj"], quantize_base="nf4", quant_storage=storage)
    assert before == {n: (p.requires_grad, type(m).__name__) for n, p in model.named_parameters()
                      for m in [model.get_submodule(n.rpartition(".")[0])]}


def test_load_adapter_makes_new_layers_in_the_models_mode(tmp_path):
    """An adapter reaching modules no other adapter targets gives them LoRA layers in the model's mode: in eval,
    no dropout, so two forwards agree, with PEFT's logits."""
    torch.manual_seed(0)
    peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["k_proj"], lora_dropout=0.3,
                                                  init_lora_weights=False)).save_pretrained(str(tmp_path))
    ours = lora_ext.get_peft_model(_llama(), r=4, target_modules=["q_proj"]).eval()
    ours.load_adapter(str(tmp_path), "k")
    ours.set_adapter("k")
    theirs = peft.PeftModel.from_pretrained(_llama(), str(tmp_path)).eval()
    assert not any(m.training for m in ours.modules())
    with torch.no_grad():
        first = ours(_ids()).logits
        assert torch.equal(first, ours(_ids()).logits)
        torch.testing.assert_close(first, theirs(_ids()).logits, rtol=1e-5, atol=1e-5)


def test_modules_to_save_on_another_adapters_lora_layer_is_refused_and_nothing_changes(tmp_path):
    """PEFT refuses to train in full a module that is another adapter's LoRA layer; here too, and the other
    adapter still saves and reloads as it was."""
    ours = lora_ext.get_peft_model(_llama(), r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    with pytest.raises(TypeError, match="modules_to_save cannot be applied"):
        peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).add_adapter(
            "b", peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["v_proj"]))
    with pytest.raises(ValueError, match=r"modules_to_save \[.*v_proj.*\] are \(or contain\) LoRA layers of the "
                                         r"model's other adapters"):
        ours.add_adapter("b", r=4, modules_to_save=["v_proj"])
    assert sorted(ours.peft_config) == ["default"] and not ours.saved_modules() and len(ours.lora_layers()) == 4
    ours.save_pretrained(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(lora_ext.LoraModel.from_pretrained(_llama(), str(tmp_path))(_ids()).logits,
                                   ours(_ids()).logits)


def test_merging_tied_weights_is_refused_before_any_layer_merges():
    """Layer 1's v_proj shares layer 0's weight: merge_adapter and merge_and_unload refuse before the first layer
    merges (no layer merged, none unloaded, the output as before)."""
    model = _llama()
    model.model.layers[1].self_attn.v_proj.weight = model.model.layers[0].self_attn.v_proj.weight
    ours = lora_ext.get_peft_model(model, r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False).eval()
    with torch.no_grad():
        before = ours(_ids()).logits
    for call in (ours.merge_adapter, ours.merge_and_unload):
        with pytest.raises(RuntimeError, match="tied weights"):
            call()
        assert len(ours.lora_layers()) == 4 and not any(m.merged for m in ours.lora_layers().values())
    with torch.no_grad():
        assert torch.equal(ours(_ids()).logits, before)


def test_trainer_with_its_default_arguments_trains_and_evaluates_as_with_peft(tmp_path):
    """transformers.Trainer keeps only the batch columns the model's forward names and takes its label names
    from it: with the default remove_unused_columns=True our model trains, and evaluate() reports the loss
    PEFT's model gives (B = 0 at the start: the base model's loss)."""
    pattern = torch.arange(16) % 12 + 3
    data = [{"input_ids": pattern.roll(i), "labels": pattern.roll(i), "unused": i} for i in range(8)]
    results = {}
    for name, model in (("ours", lora_ext.get_peft_model(_llama(), r=4, lora_alpha=8)),
                        ("peft", peft.get_peft_model(_llama(), peft.LoraConfig(
                            r=4, lora_alpha=8, target_modules=lora_ext.model.DEFAULT_TARGETS)))):
        args = transformers.TrainingArguments(output_dir=str(tmp_path / name), max_steps=2,
                                              per_device_train_batch_size=4, report_to=[], save_strategy="no",
                                              logging_steps=1, use_cpu=True, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
        assert trainer.label_names == ["labels"]
        results[name] = trainer.evaluate()["eval_loss"]
        trainer.train()
        assert len([h for h in trainer.state.log_history if "loss" in h]) == 2
    assert results["ours"] == pytest.approx(results["peft"], rel=1e-5)
