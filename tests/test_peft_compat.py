"""The calls users paste from Unsloth and PEFT: Unsloth's get_peft_model keywords (gradient checkpointing,
offloaded too), a PEFT LoraConfig object, rank_pattern / alpha_pattern both ways with PEFT, LoRA+.
Real Hugging Face model classes from small configs; the real PEFT package as the oracle."""
import copy
import json
import re

import pytest
import torch

import lora_ext
from lora_ext import checkpointing

from conftest import requires_c, requires_cuda

pytestmark = requires_c
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_models import llama, llama_classifier, randomize_adapters, t5, token_ids  # noqa: E402

UNSLOTH_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _frozen_state(model):
    return {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}


def _assert_untouched(model, before):
    assert not any(isinstance(m, lora_ext.LoraLinear) for m in model.modules())
    after = _frozen_state(model)
    assert after.keys() == before.keys()
    for n, (grad, value) in before.items():
        assert after[n][0] == grad and torch.equal(after[n][1], value), n


def _loss_and_grads(model, seed=11):
    model.train()
    torch.manual_seed(seed)
    ids = torch.randint(0, 96, (3, 17), generator=torch.Generator().manual_seed(2))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_the_unsloth_call_runs_as_pasted():
    model = lora_ext.get_peft_model(llama(), r=16, target_modules=UNSLOTH_TARGETS, lora_alpha=16, lora_dropout=0,
                                    bias="none", use_gradient_checkpointing="unsloth", random_state=3407,
                                    use_rslora=False, loftq_config=None)
    theirs = peft.get_peft_model(llama(), peft.LoraConfig(r=16, lora_alpha=16, target_modules=UNSLOTH_TARGETS))
    assert model.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    decoder_layers = [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    assert decoder_layers and all(m.gradient_checkpointing for m in decoder_layers)
    assert all(m._gradient_checkpointing_func is checkpointing.offloaded_checkpoint for m in decoder_layers)
    loss, grads = _loss_and_grads(model)
    assert torch.isfinite(loss) and len(grads) == 2 * len(model.lora_layers())
    assert all(g.abs().sum() == 0 for n, g in grads.items() if "lora_A" in n)  # B = 0 at the start
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpointing_off_on_and_offloaded_give_the_same_gradients(dropout):
    """The recomputation draws the same dropout masks (the generators are restored) and the frozen
    embedding still lets gradients reach the adapters of the first layer."""
    results, calls = {}, []
    for mode in (False, True, "unsloth"):
        model = lora_ext.get_peft_model(llama(), r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                                        use_gradient_checkpointing=mode)
        for layer in model.base_model.model.model.layers:  # count the checkpointed calls
            if mode is not False:
                inner = layer._gradient_checkpointing_func
                layer._gradient_checkpointing_func = lambda *a, inner=inner: calls.append(mode) or inner(*a)
        results[mode] = _loss_and_grads(model)
    assert calls == [True, True, "unsloth", "unsloth"]  # every decoder layer, once each
    loss, grads = results[False]
    assert grads["base_model.model.model.layers.0.self_attn.q_proj.lora_A"].abs().sum() > 0
    for mode in (True, "unsloth"):
        torch.testing.assert_close(results[mode][0], loss, rtol=0, atol=0)
        assert results[mode][1].keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(results[mode][1][name], g, rtol=1e-5, atol=1e-7, msg=f"{mode}: {name}")


def test_offloaded_checkpoint_recomputes_and_matches_plain_autograd():
    calls = []
    weight = torch.randn(6, 6, requires_grad=True)

    def layer(h, scale):
        calls.append(1)
        return torch.nn.functional.dropout(torch.tanh(h @ weight) * scale, 0.3, training=True)

    h = torch.randn(4, 6, requires_grad=True)
    torch.manual_seed(3)
    plain = layer(h, 2.0)
    plain.sum().backward()
    g_h, g_w = h.grad.clone(), weight.grad.clone()
    h.grad = weight.grad = None
    torch.manual_seed(3)
    out = checkpointing.offloaded_checkpoint(layer, h, 2.0)
    assert len(calls) == 2 and torch.equal(out, plain)
    out.sum().backward()
    assert len(calls) == 3  # once more, in the backward
    torch.testing.assert_close(h.grad, g_h, rtol=0, atol=0)
    torch.testing.assert_close(weight.grad, g_w, rtol=0, atol=0)


@requires_cuda
def test_offloaded_checkpointing_keeps_less_on_the_gpu():
    """After the forward, 'unsloth' holds each checkpointed layer's input in pinned CPU memory instead of
    on the GPU: the GPU keeps at least that much less, and the gradients equal plain checkpointing's."""
    kept, grads = {}, {}
    layers, batch, seq, hidden = 4, 4, 256, 256
    for mode in (True, "unsloth"):
        model = lora_ext.get_peft_model(llama(hidden_size=hidden, intermediate_size=512, num_hidden_layers=layers,
                                              max_position_embeddings=seq), r=8, init_lora_weights=False,
                                        use_gradient_checkpointing=mode).cuda().train()
        ids = torch.randint(0, 96, (batch, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = model(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        kept[mode] = torch.cuda.memory_allocated() - before
        loss.backward()
        grads[mode] = {n: p.grad.cpu() for n, p in model.named_parameters() if p.requires_grad}
        del model, loss
        torch.cuda.empty_cache()
    hidden_states = layers * batch * seq * hidden * 4  # fp32 inputs of the checkpointed layers
    assert kept[True] - kept["unsloth"] >= 0.9 * hidden_states, (kept, hidden_states)
    for name, g in grads[True].items():
        torch.testing.assert_close(grads["unsloth"][name], g, rtol=1e-4, atol=1e-6)


def test_peft_lora_config_object_gives_what_the_keywords_give():
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.05,
                             rank_pattern={"down_proj": 4}, alpha_pattern={"q_proj": 32})
    ours = lora_ext.get_peft_model(llama(), config)
    by_keywords = lora_ext.get_peft_model(llama(), r=8, lora_alpha=16, target_modules="all-linear",
                                          lora_dropout=0.05, rank_pattern={"down_proj": 4},
                                          alpha_pattern={"q_proj": 32})
    theirs = peft.get_peft_model(llama(), config)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert sorted(ours.lora_layers()) == sorted(by_keywords.lora_layers())
    for name, layer in ours.lora_layers().items():
        other = by_keywords.lora_layers()[name]
        assert (layer.r, layer.scaling, layer.lora_dropout) == (other.r, other.scaling, other.lora_dropout)
        assert torch.equal(layer.lora_A, other.lora_A)  # the same random_state
    # lora_ext's own LoraConfig object too
    again = lora_ext.get_peft_model(llama(), ours.peft_config["default"])
    assert {n: m.r for n, m in again.lora_layers().items()} == {n: m.r for n, m in ours.lora_layers().items()}


@pytest.mark.parametrize("config, message", [
    (dict(exclude_modules=["q_proj"]), "exclude_modules="),
    (dict(lora_bias=True), "lora_bias=True"),
    (dict(inference_mode=True), "inference_mode=True"),
])
def test_config_fields_lora_ext_lacks_are_named_and_change_nothing(config, message):
    model = llama()
    before = _frozen_state(model)
    with pytest.raises(ValueError, match=message):
        lora_ext.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"], **config))
    _assert_untouched(model, before)


def test_keywords_that_ask_for_nothing_pass_and_the_others_are_named():
    lora_ext.get_peft_model(llama(), r=4, use_dora=False, layers_pattern=None, qat_scheme=None, task_type=None)
    model = llama()
    before = _frozen_state(model)
    with pytest.raises(TypeError, match=r"not supported by lora_ext: qat_scheme='int4-weight', "
                                        r"temporary_location='tmp'"):
        lora_ext.get_peft_model(model, r=4, temporary_location="tmp", qat_scheme="int4-weight")
    with pytest.raises(TypeError, match=r"either a LoraConfig or LoRA keywords.*\['lora_alpha'\]"):
        lora_ext.get_peft_model(model, peft.LoraConfig(r=4), lora_alpha=32)
    with pytest.raises(ValueError, match="use_gradient_checkpointing must be False, True or 'unsloth', got 'yes'"):
        lora_ext.get_peft_model(model, r=4, use_gradient_checkpointing="yes")
    with pytest.raises(ValueError, match="max_seq_length=128 exceeds the model's max_position_embeddings=64"):
        lora_ext.get_peft_model(model, r=4, max_seq_length=128)
    with pytest.raises(ValueError, match="loftq_config is given but init_lora_weights=True"):
        lora_ext.get_peft_model(model, r=4, loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    with pytest.raises(ValueError, match="init_lora_weights='loftq' needs a 4-bit base"):
        lora_ext.get_peft_model(model, r=4, init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    with pytest.raises(ValueError, match=r"rank_pattern\['q_proj'\] must be an integer >= 1, got 0"):
        lora_ext.get_peft_model(model, r=4, rank_pattern={"q_proj": 0})
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj: r must be .* \[1, 32\], got 40"):
        lora_ext.get_peft_model(model, r=4, rank_pattern={"k_proj": 40})
    _assert_untouched(model, before)
    assert lora_ext.get_peft_model(model, r=4, max_seq_length=48).max_seq_length == 48


PATTERNS = dict(rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 12},
                alpha_pattern={"v_proj": 3, "up_proj": 40})


def test_rank_and_alpha_patterns_as_peft_both_ways(tmp_path):
    ours = lora_ext.get_peft_model(llama(), r=6, lora_alpha=8, **PATTERNS)
    layers = ours.lora_layers()
    assert layers["model.layers.0.self_attn.q_proj"].r == 2 and layers["model.layers.1.mlp.down_proj"].r == 12
    assert layers["model.layers.0.mlp.down_proj"].r == 6 and layers["model.layers.1.mlp.up_proj"].scaling == 40 / 6
    randomize_adapters(ours)
    ours.save_pretrained(str(tmp_path / "ours"))
    theirs = peft.PeftModel.from_pretrained(llama(), str(tmp_path / "ours")).eval()
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
    # and PEFT's adapter with patterns, loaded here
    peft_model = peft.get_peft_model(llama(), peft.LoraConfig(r=6, lora_alpha=8, target_modules=UNSLOTH_TARGETS,
                                                              init_lora_weights=False, **PATTERNS))
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    loaded = lora_ext.LoraModel.from_pretrained(llama(), str(tmp_path / "theirs"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, peft_model.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    # as a second adapter beside one without patterns: set_adapter takes each layer's own alpha and rank
    plain = lora_ext.get_peft_model(llama(), r=6, lora_alpha=8)
    plain.load_adapter(str(tmp_path / "theirs"), "patterned")
    plain.set_adapter("patterned")
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(ids).logits, peft_model(ids).logits, rtol=1e-5, atol=1e-5)
    plain.add_adapter("third", r=3, rank_pattern={"o_proj": 5})
    plain.set_adapter("third")
    assert plain.lora_layers()["model.layers.1.self_attn.o_proj"].r == 5
    assert plain.lora_layers()["model.layers.1.self_attn.v_proj"].r == 3


def test_loraplus_optimizer_has_peft_groups():
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus

    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="lora_only",
                  modules_to_save=["lm_head"])
    ours = lora_ext.get_peft_model(llama(), **kwargs)
    theirs = peft.get_peft_model(llama(), peft.LoraConfig(**kwargs))
    mine = lora_ext.create_loraplus_optimizer(ours, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16,
                                              loraplus_weight_decay=0.01, betas=(0.9, 0.99))
    reference = peft_loraplus(theirs, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16, loraplus_weight_decay=0.01,
                              betas=(0.9, 0.99))

    def summary(opt):
        return [(g["lr"], g["weight_decay"], g["betas"], sorted(tuple(p.shape) for p in g["params"]))
                for g in opt.param_groups]
    assert summary(mine) == summary(reference)
    assert mine.param_groups[2]["lr"] == pytest.approx(16 * 2e-4) and mine.param_groups[2]["params"]
    with pytest.raises(ValueError, match="loraplus_lr_ratio must be > 0"):
        lora_ext.create_loraplus_optimizer(ours, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_models_save_as_plain_lora_over_the_original_base(tmp_path, init):
    """The init changes the base, and the model's output at init is the original model's; saved with
    path_initial_model_for_weight_conversion, the trained adapter loads (in PEFT and here) onto the
    ORIGINAL base with the same logits."""
    ids = token_ids()
    model = lora_ext.get_peft_model(llama(), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                    init_lora_weights=init)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, llama()(ids).logits, rtol=1e-4, atol=1e-4)
    model.save_pretrained(str(tmp_path / "initial"))
    with torch.no_grad():  # as training would
        for layer in model.lora_layers().values():
            layer.lora_A.add_(torch.randn_like(layer.lora_A) * 0.05)
            layer.lora_B.add_(torch.randn_like(layer.lora_B) * 0.05)
        trained = model(ids).logits
    model.save_pretrained(str(tmp_path / "plain"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    config = peft.LoraConfig.from_pretrained(str(tmp_path / "plain"))
    assert config.r == 8 and config.lora_alpha == 16
    theirs = peft.PeftModel.from_pretrained(llama(), str(tmp_path / "plain")).eval()
    ours = lora_ext.LoraModel.from_pretrained(llama(), str(tmp_path / "plain")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, trained, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours(ids).logits, trained, rtol=1e-4, atol=1e-4)


def _nudge_adapters(model):
    """As training would: A and B (ours or PEFT's) moved off their initial values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_adapters_load_onto_the_original_base_as_in_peft(tmp_path, init):
    """A PiSSA/OLoRA adapter saved as it is, by PEFT or by us, is read as PEFT reads it: meant for the original
    base, whose top the init moves into the adapter again before the saved A and B replace it. Saved for the base
    the init left (init_lora_weights=True, PEFT's advice), it loads onto that base as it is; load_adapter, which
    would change the base under the other adapters, refuses such an adapter and changes nothing."""
    ids, targets = token_ids(), ["q_proj", "v_proj"]
    theirs = peft.get_peft_model(llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                          init_lora_weights=init))
    _nudge_adapters(theirs)
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = lora_ext.get_peft_model(llama(), r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init)
    _nudge_adapters(ours)
    ours.save_pretrained(str(tmp_path / "ours"))
    with torch.no_grad():
        for trained, saved in ((theirs.eval(), "peft"), (ours.eval(), "ours")):
            expected = trained(ids).logits
            for reader in (lora_ext.LoraModel, peft.PeftModel):
                reloaded = reader.from_pretrained(llama(), str(tmp_path / saved)).eval()
                torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-4, atol=1e-4)
    residual = llama()
    residual.load_state_dict(ours.base_state_dict())
    ours.peft_config["default"].init_lora_weights = True
    ours.save_pretrained(str(tmp_path / "for_residual"))
    with torch.no_grad():
        for reader in (lora_ext.LoraModel, peft.PeftModel):
            reloaded = reader.from_pretrained(copy.deepcopy(residual), str(tmp_path / "for_residual")).eval()
            torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-4, atol=1e-4)
    other = lora_ext.get_peft_model(llama(), r=4, target_modules=targets)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}': such an adapter is read .* as meant for "
                                         rf"the original base"):
        other.load_adapter(str(tmp_path / "peft"), "pissa")
    assert sorted(other.peft_config) == ["default"] and other.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_loftq_through_get_peft_model():
    """quantize_base='nf4' with LoftQ: every Linear ends up 4-bit, the targets as LoftQ's NF4 of what the
    adapter does not hold, which is closer to the dense weight than plain NF4 of it."""
    dense = llama()
    model = lora_ext.get_peft_model(llama(), r=8, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                    quantize_base="nf4", init_lora_weights="loftq",
                                    loftq_config={"loftq_bits": 4, "loftq_iter": 2})
    assert isinstance(model.base_model.model.model.layers[0].self_attn.k_proj, lora_ext.NF4Linear)
    for name, layer in model.lora_layers().items():
        assert isinstance(layer.base_layer, lora_ext.NF4Linear)
        w = dense.get_submodule(name).weight.detach()
        with torch.no_grad():
            loftq = layer.base_layer.dequantize(torch.float32) + layer.scaling * layer.lora_B @ layer.lora_A
        plain = lora_ext.quantize_nf4(w, 64, True).dequantize(torch.float32)
        assert (w - loftq).norm() < 0.97 * (w - plain).norm(), name


def _peft_targets(peft_model):
    """The module paths PEFT put a LoRA layer on."""
    return sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer))


def _logits(model, ids=None):
    ids = token_ids() if ids is None else ids
    extra = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        return model(input_ids=ids, **extra).logits


LAYER_CASES = {  # PEFT's rule: the first numbered segment, or the number after a layers_pattern name
    "t5 block, not its sublayer": (t5, dict(target_modules=["q", "v"], layers_to_transform=[1])),
    "pattern str": (llama, dict(target_modules=["q_proj", "down_proj"], layers_to_transform=1,
                                layers_pattern="layers")),
    "pattern list": (llama, dict(target_modules=["q_proj"], layers_to_transform=[0],
                                 layers_pattern=["blocks", "layers"])),
    "a full path is not filtered": (llama, dict(target_modules=["q_proj", "model.layers.0.self_attn.v_proj"],
                                                layers_to_transform=[1])),
}


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layers_to_transform_picks_the_layers_peft_picks(tmp_path, case):
    make, kw = LAYER_CASES[case]
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=4, init_lora_weights=False, **kw)).eval()
    ours = lora_ext.get_peft_model(make(), r=4, **kw)
    assert sorted(ours.lora_layers()) == _peft_targets(theirs)
    # both ways through the files, layers_pattern included
    theirs.save_pretrained(str(tmp_path / "theirs"))
    loaded = lora_ext.LoraModel.from_pretrained(make(), str(tmp_path / "theirs"))
    torch.testing.assert_close(_logits(loaded), _logits(theirs), rtol=1e-5, atol=1e-5)
    randomize_adapters(ours)
    ours.save_pretrained(str(tmp_path / "ours"))
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["layers_pattern"] == kw.get("layers_pattern")
    back = peft.PeftModel.from_pretrained(make(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(_logits(back), _logits(ours), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets", [r".*\.(q_proj|down_proj)", "all-linear"])
@pytest.mark.parametrize("field, message", [
    ("layers_to_transform", "`layers_to_transform` cannot be used when `target_modules` is a str."),
    ("layers_pattern", "`layers_pattern` cannot be used when `target_modules` is a str."),
])
def test_layer_selection_with_a_str_target_is_refused_as_in_peft(targets, field, message):
    kw = dict(layers_pattern="layers") if field == "layers_pattern" else dict(layers_to_transform=[1])
    with pytest.raises(ValueError, match=re.escape(message)):
        peft.LoraConfig(r=4, target_modules=targets, **kw)
    model = llama()
    before = _frozen_state(model)
    with pytest.raises(ValueError, match="get_peft_model: " + re.escape(message)):
        lora_ext.get_peft_model(model, r=4, target_modules=targets, **kw)
    _assert_untouched(model, before)


def test_empty_containers_ask_for_nothing_as_in_peft(tmp_path):
    """A field whose PEFT default is None, set to [] or {}, is the default (PEFT reads it so)."""
    empty = dict(exclude_modules=[], target_parameters=[], layers_pattern=[])
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False, **empty)
    ours = lora_ext.get_peft_model(llama(), config)
    theirs = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False,
                                                          **empty)).eval()
    assert sorted(ours.lora_layers()) == _peft_targets(theirs)
    theirs.save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(empty, megatron_config={}, eva_config={}, corda_config={})
    path.write_text(json.dumps(cfg))
    reread = peft.PeftModel.from_pretrained(llama(), str(tmp_path)).eval()
    loaded = lora_ext.LoraModel.from_pretrained(llama(), str(tmp_path))
    torch.testing.assert_close(_logits(loaded), _logits(reread), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(loaded), _logits(theirs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (dict(lora_alpha="16"), "lora_alpha must be a number >= 0, got '16'"),
    (dict(lora_alpha=True), "lora_alpha must be a number >= 0, got True"),
    (dict(lora_dropout=1.0), r"lora_dropout must be a number in \[0, 1\), got 1.0"),
    (dict(lora_dropout=-0.1), r"lora_dropout must be a number in \[0, 1\), got -0.1"),
    (dict(use_rslora="no"), "use_rslora must be True or False, got 'no'"),
    (dict(layers_to_transform="1"), "layers_to_transform must be None, a layer index or a list of them, got '1'"),
    (dict(layers_pattern="layers"), "When `layers_pattern` is specified, `layers_to_transform` must also be"),
    (dict(modules_to_save="lm_head"), "modules_to_save must be None or a list of module names, got 'lm_head'"),
    (dict(task_type="CLASSIFY"), "task_type must be None or one of"),
])
def test_bad_values_are_refused_before_the_model_changes(bad, message):
    model = llama()
    before = _frozen_state(model)
    with pytest.raises(ValueError, match="get_peft_model: " + message):
        lora_ext.get_peft_model(model, r=4, target_modules=["q_proj"], **bad)
    _assert_untouched(model, before)
    keywords = ("lora_alpha", "lora_dropout", "use_rslora", "modules_to_save")
    if set(bad) <= set(keywords):  # add_adapter too: refused, nothing added
        lora = lora_ext.get_peft_model(llama(), r=4, target_modules=["q_proj"])
        with pytest.raises(ValueError, match=r"add_adapter\('x'\): " + message):
            lora.add_adapter("x", **bad)
        assert list(lora.peft_config) == ["default"] and not lora._stored


def _trained_outside_lora(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_seq_cls_trains_the_head_as_peft_and_saves_its_task(tmp_path, targets):
    """task_type='SEQ_CLS': the head (score/classifier) joins modules_to_save as PEFT's
    PeftModelForSequenceClassification does, so all-linear leaves it out; the file says the task."""
    config = dict(r=4, target_modules=targets, task_type="SEQ_CLS")
    theirs = peft.get_peft_model(llama_classifier(), peft.LoraConfig(**config))
    ours = lora_ext.get_peft_model(llama_classifier(), peft.LoraConfig(**config))
    by_keywords = lora_ext.get_peft_model(llama_classifier(), **config)
    assert _trained_outside_lora(ours) == _trained_outside_lora(theirs) == _trained_outside_lora(by_keywords) == \
        ["base_model.model.score.modules_to_save.default.weight"]
    assert sorted(ours.lora_layers()) == _peft_targets(theirs) == sorted(by_keywords.lora_layers())
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    ours.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["task_type"], cfg["modules_to_save"], cfg["auto_mapping"]) == ("SEQ_CLS", ["classifier", "score"], None)
    back = peft.PeftModel.from_pretrained(llama_classifier(), str(tmp_path)).eval()
    assert type(back).__name__ == "PeftModelForSequenceClassification"
    torch.testing.assert_close(_logits(back), _logits(ours), rtol=1e-5, atol=1e-5)
    again = lora_ext.LoraModel.from_pretrained(llama_classifier(), str(tmp_path))
    assert again.peft_config["default"].task_type == "SEQ_CLS"
    torch.testing.assert_close(_logits(again), _logits(ours), rtol=1e-5, atol=1e-5)


def test_task_type_and_auto_mapping_as_peft_writes_them(tmp_path):
    """No task_type: PEFT's auto_mapping (so AutoPeftModel rebuilds the base); a task_type survives a load and a
    save here."""
    llama().save_pretrained(str(tmp_path / "base"))

    def base():
        return transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).eval()

    ours = lora_ext.get_peft_model(base(), r=4, target_modules=["q_proj"])
    randomize_adapters(ours)
    ours.save_pretrained(str(tmp_path / "ours"))
    peft.get_peft_model(base(), peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(str(tmp_path / "peft"))
    mine, reference = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft"))
    assert mine["task_type"] is None and mine["auto_mapping"] == reference["auto_mapping"] is not None
    for auto in (peft.AutoPeftModelForCausalLM, peft.AutoPeftModel):
        torch.testing.assert_close(_logits(auto.from_pretrained(str(tmp_path / "ours")).eval()), _logits(ours),
                                   rtol=1e-5, atol=1e-5)
    theirs = peft.get_peft_model(base(), peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    theirs.save_pretrained(str(tmp_path / "causal"))
    lora_ext.LoraModel.from_pretrained(base(), str(tmp_path / "causal")).save_pretrained(str(tmp_path / "again"))
    cfg = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert (cfg["task_type"], cfg["auto_mapping"]) == ("CAUSAL_LM", None)
    assert type(peft.PeftModel.from_pretrained(base(), str(tmp_path / "again"))).__name__ == "PeftModelForCausalLM"


def test_add_adapter_takes_a_peft_lora_config_as_peft_does():
    """PEFT's add_adapter(name, LoraConfig): the same adapter as the keywords give, PEFT's logits once set
    active; a config for other modules is refused by name and changes nothing. active_adapters and
    get_base_model are PEFT's."""
    targets = ["v_proj", "q_proj"]
    ours = lora_ext.get_peft_model(llama(), r=4, lora_alpha=8, target_modules=targets)
    theirs = peft.get_peft_model(llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    config = peft.LoraConfig(r=8, lora_alpha=32, target_modules=targets, use_rslora=True, init_lora_weights=False)
    ours.add_adapter("b", config)
    theirs.add_adapter("b", config)
    assert (ours.peft_config["b"].r, ours.peft_config["b"].lora_alpha, ours.peft_config["b"].use_rslora) == (8, 32, True)
    ours.set_adapter("b")
    theirs.set_adapter("b")
    with torch.no_grad():  # B of both copied from PEFT's (each side's init draws its own random numbers)
        for name, layer in ours.lora_layers().items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            layer.lora_A.copy_(peft_layer.lora_A["b"].weight)
            layer.lora_B.copy_(peft_layer.lora_B["b"].weight)
        torch.testing.assert_close(ours.eval()(token_ids()).logits, theirs.eval()(token_ids()).logits,
                                   rtol=1e-5, atol=1e-5)
    assert ours.active_adapters == theirs.active_adapters == ["b"]
    assert ours.get_base_model() is ours.base_model.model
    with pytest.raises(ValueError, match=r"add_adapter\('c', LoraConfig\): a new adapter goes on the active "
                                         r"adapter's modules; the config's target_modules=\['k_proj'\] differ"):
        ours.add_adapter("c", peft.LoraConfig(r=4, target_modules=["k_proj"]))
    assert sorted(ours.peft_config) == ["b", "default"]


def test_trainable_tensors_follow_peft_through_loads_and_switches(tmp_path):
    """Which tensors train after each call, against PEFT making the same calls: from_pretrained and
    load_adapter are for inference unless is_trainable=True (frozen, eval mode); an adapter loaded beside the
    active one trains nothing, its biases neither; set_adapter makes the adapter it activates trainable (frozen
    with inference_mode=True)."""
    targets = ["q_proj", "v_proj"]
    for name, bias in (("a", "none"), ("b", "all")):
        peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=targets, bias=bias)).save_pretrained(
            str(tmp_path / name))

    def trainable(model):
        return model.get_nb_trainable_parameters()[0]

    ours = lora_ext.LoraModel.from_pretrained(llama(), str(tmp_path / "a"))
    theirs = peft.PeftModel.from_pretrained(llama(), str(tmp_path / "a"))
    assert trainable(ours) == trainable(theirs) == 0 and not ours.training and not theirs.training
    ours = lora_ext.LoraModel.from_pretrained(llama().train(), str(tmp_path / "a"), is_trainable=True)
    theirs = peft.PeftModel.from_pretrained(llama().train(), str(tmp_path / "a"), is_trainable=True)
    assert trainable(ours) == trainable(theirs) > 0
    before = trainable(ours)
    ours.load_adapter(str(tmp_path / "b"), "b", is_trainable=True)
    theirs.load_adapter(str(tmp_path / "b"), "b", is_trainable=True)
    # b's biases (bias="all") wait for set_adapter; PEFT counts b's A and B already (its inactive adapters are
    # parameters of the model, ours are kept beside the layers)
    assert trainable(ours) == before and ours.training
    for model in (ours, theirs):
        model.requires_grad_(False)
        model.set_adapter("b")
    assert trainable(ours) == trainable(theirs) > 0
    for model in (ours, theirs):
        model.set_adapter("b", inference_mode=True)
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == \
        sorted(n for n, p in theirs.named_parameters() if p.requires_grad and ".b." not in n)
