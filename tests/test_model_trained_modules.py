"""What an adapter trains besides LoRA, as PEFT does it: biases (bias='all' / 'lora_only') and whole
modules (modules_to_save). PEFT is the oracle for what is trainable, what is saved and the logits."""
import pytest
import torch
from safetensors.torch import load_file

import lora_ext

from conftest import requires_c

pytestmark = requires_c
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_models import llama, llama_classifier, randomize_adapters, token_ids  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _biased_llama(seed=0):
    model = llama(seed, attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)  # HF starts them at zero: a bias that is never copied would go unnoticed
    return model


def _perturb_trained(model):
    """Move every trainable tensor away from where it started, as training would."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def _saved_keys(directory):
    return set(load_file(str(directory / "adapter_model.safetensors")))


def _trained_and_read_both_ways(ours, theirs, make_base, tmp_path):
    """Train (perturb) both, save both: the same saved keys, and each library reads the other's adapter
    with the same logits."""
    _perturb_trained(ours)
    _perturb_trained(theirs)
    ours.save_pretrained(str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    assert _saved_keys(tmp_path / "ours") == _saved_keys(tmp_path / "theirs")
    ids = token_ids()
    with torch.no_grad():
        peft_reads_ours = peft.PeftModel.from_pretrained(make_base(), str(tmp_path / "ours")).eval()
        torch.testing.assert_close(peft_reads_ours(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
        we_read_theirs = lora_ext.LoraModel.from_pretrained(make_base(), str(tmp_path / "theirs"))
        torch.testing.assert_close(we_read_theirs(ids).logits, theirs.eval()(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(we_read_theirs(ids).logits, make_base()(ids).logits, atol=1e-3)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_training_matches_peft_both_ways(tmp_path, bias):
    ours = lora_ext.get_peft_model(_biased_llama(), r=4, lora_alpha=8, target_modules=TARGETS, bias=bias)
    theirs = peft.get_peft_model(_biased_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, bias=bias))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable == {n for n, p in theirs.named_parameters() if p.requires_grad and "lora_" not in n}
    _trained_and_read_both_ways(ours, theirs, _biased_llama, tmp_path)


def test_qlora_bias_trains_on_the_nf4_base():
    model = lora_ext.get_peft_model(_biased_llama(), r=4, target_modules=TARGETS, bias="lora_only",
                                    quantize_base="nf4")
    layer = model.lora_layers()["model.layers.0.self_attn.q_proj"]
    assert isinstance(layer.base_layer, lora_ext.NF4Linear) and layer.base_layer.bias.requires_grad
    model(input_ids=token_ids(), labels=token_ids()).loss.backward()
    assert layer.base_layer.bias.grad is not None and layer.base_layer.bias.grad.abs().sum() > 0


def test_modules_to_save_matches_peft_both_ways(tmp_path):
    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["lm_head", "norm"])
    ours = lora_ext.get_peft_model(llama(), **kwargs)
    theirs = peft.get_peft_model(llama(), peft.LoraConfig(**kwargs))
    # "norm" also takes input_layernorm / post_attention_layernorm: PEFT's suffix rule.
    assert sorted(ours.saved_modules()) == sorted(
        n for n, m in theirs.base_model.model.named_modules() if type(m).__name__ == "ModulesToSaveWrapper")
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    not_lora = lambda keys: {k for k in keys if "lora_" not in k}  # noqa: E731  (LoRA keys: our one-adapter layout)
    assert not_lora(ours.state_dict()) == not_lora(theirs.state_dict())  # same in-memory names for the rest
    _trained_and_read_both_ways(ours, theirs, llama, tmp_path)
    ids = token_ids()
    with torch.no_grad():
        # The originals stay frozen and untouched: disabling gives the base model back.
        with ours.disable_adapter():
            torch.testing.assert_close(ours(ids).logits, llama()(ids).logits)
        adapted = ours(ids).logits
        merged = ours.merge_and_unload()
        assert isinstance(merged.lm_head, torch.nn.Linear)
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-4, atol=1e-4)


def test_classifier_head_trains_and_qlora_leaves_it_dense(tmp_path):
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=112, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    model = lora_ext.get_peft_model(transformers.BertForSequenceClassification(cfg), r=4,
                                    target_modules=["query", "value"], modules_to_save=["classifier"],
                                    quantize_base="nf4")
    head = model.saved_modules()["classifier"]
    assert isinstance(head.modules_to_save["default"], torch.nn.Linear)  # trained in full, not quantized
    assert isinstance(model.base_model.model.bert.encoder.layer[0].attention.self.key, lora_ext.NF4Linear)
    out = model(input_ids=token_ids(), labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert head.modules_to_save["default"].weight.grad is not None
    assert head.original_module.weight.grad is None and not head.original_module.weight.requires_grad


def test_each_adapter_has_its_own_copy(tmp_path):
    model = lora_ext.get_peft_model(llama(), r=4, target_modules=TARGETS, modules_to_save=["lm_head"])
    randomize_adapters(model)
    _perturb_trained(model)
    ids = token_ids()
    with torch.no_grad():
        first = model(ids).logits
        model.add_adapter("second", r=4, modules_to_save=["lm_head"])  # a fresh copy of the original head
        torch.testing.assert_close(model(ids).logits, first)  # adding does not change what runs
        head = model.saved_modules()["lm_head"]
        assert head.modules_to_save["default"].weight.requires_grad
        assert not head.modules_to_save["second"].weight.requires_grad  # only the active copy trains (PEFT)
        model.set_adapter("second")
        assert head.modules_to_save["second"].weight.requires_grad
        assert not head.modules_to_save["default"].weight.requires_grad
        torch.testing.assert_close(model(ids).logits, llama()(ids).logits)  # B = 0 and an untrained head
        model.saved_modules()["lm_head"].modules_to_save["second"].weight.mul_(2)
        second = model(ids).logits
        model.set_adapter("default")
        torch.testing.assert_close(model(ids).logits, first)
        model.save_pretrained(str(tmp_path))
        other = lora_ext.get_peft_model(llama(), r=4, target_modules=TARGETS)
        other.load_adapter(str(tmp_path / "second"), "second")  # wraps lm_head on demand
        torch.testing.assert_close(other(ids).logits, llama()(ids).logits)  # "default" (B = 0) still runs
        other.set_adapter("second")
        torch.testing.assert_close(other(ids).logits, second)
        other.set_adapter("default")  # no copy of lm_head: the original runs
        torch.testing.assert_close(other(ids).logits, llama()(ids).logits)
        model.set_adapter("second")
        model.delete_adapter("default")
        assert list(model.saved_modules()["lm_head"].modules_to_save) == ["second"]


def test_bad_trained_module_requests_name_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match=r"bias must be one of \('none', 'all', 'lora_only'\), got 'some'"):
        lora_ext.get_peft_model(llama(), bias="some")
    with pytest.raises(ValueError, match=r"modules_to_save \['lm_haed'\] matches no module; closest: \['lm_head'\]"):
        lora_ext.get_peft_model(llama(), modules_to_save=["lm_haed"])
    with pytest.raises(ValueError, match=r"every module target_modules \['q_proj'\] matches lies in modules_to_save"):
        lora_ext.get_peft_model(llama(), target_modules=["q_proj"], modules_to_save=["self_attn"])  # PEFT: the same
    model = lora_ext.get_peft_model(_biased_llama(), r=4, target_modules=TARGETS, bias="all")
    model.save_pretrained(str(tmp_path / "biased"))
    with pytest.raises(ValueError, match="adapter 'default' already trains the biases"):
        model.load_adapter(str(tmp_path / "biased"), "other")
    assert sorted(model.peft_config) == ["default"]
    # An adapter whose saved head does not fit this model (another vocabulary) is refused, model unchanged.
    lora_ext.get_peft_model(llama(vocab_size=80), r=4, target_modules=TARGETS,
                            modules_to_save=["lm_head"]).save_pretrained(str(tmp_path / "head"))
    fresh = llama()
    with pytest.raises(ValueError, match=r"lm_head.weight has shape \(80, 64\), the model needs \(96, 64\)"):
        lora_ext.LoraModel.from_pretrained(fresh, str(tmp_path / "head"))
    assert not any(isinstance(m, lora_ext.LoraLinear) for m in fresh.modules())


def test_hot_swap_follows_the_new_adapter_and_refuses_a_merged_model(tmp_path):
    model = lora_ext.get_peft_model(llama(), r=4, target_modules=TARGETS, modules_to_save=["lm_head"])
    _perturb_trained(model)
    plain = lora_ext.get_peft_model(llama(), r=4, target_modules=TARGETS, init_lora_weights=False)
    plain.save_pretrained(str(tmp_path / "plain"))
    ids = token_ids()
    with torch.no_grad():
        before = model(ids).logits
        model.merge_adapter()
        A = {n: m.lora_A.detach().clone() for n, m in model.lora_layers().items()}
        with pytest.raises(RuntimeError, match="merged into the base; call unmerge_adapter"):
            model.load_adapter(str(tmp_path / "plain"), "default")
        assert all(torch.equal(m.lora_A, A[n]) for n, m in model.lora_layers().items())
        model.add_adapter("other", r=4)
        with pytest.raises(RuntimeError, match="merged into the base"):
            model.set_adapter("other")
        model.unmerge_adapter()
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
        model.set_adapter("other")  # not lost by the refused call
        model.set_adapter("default")
        # An adapter without modules_to_save hot-swapped in: its LoRA, and the original head.
        model.load_adapter(str(tmp_path / "plain"), "default")
        assert "default" not in model.saved_modules()["lm_head"].modules_to_save
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)


def test_bias_all_with_modules_to_save_that_have_biases_is_refused_and_nothing_changes():
    with pytest.raises(ValueError, match=r"bias='all' together with modules_to_save \['model.layers.0.mlp.gate_proj', "
                                         r"'model.layers.1.mlp.gate_proj'\], which have biases, is not supported"):
        lora_ext.get_peft_model(_biased_llama(), target_modules=TARGETS, bias="all", modules_to_save=["gate_proj"])
    model = lora_ext.get_peft_model(_biased_llama(), r=4, target_modules=TARGETS, bias="all")
    with pytest.raises(ValueError, match="bias='all' together with modules_to_save"):
        model.add_adapter("head", modules_to_save=["lm_head"])
    assert sorted(model.peft_config) == ["default"] and not model.saved_modules()


def test_bias_all_with_modules_to_save_without_biases_matches_peft_both_ways(tmp_path):
    """A head without a bias (a language model's) trained in full beside bias='all' is no conflict."""
    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS, bias="all", modules_to_save=["lm_head"])
    ours = lora_ext.get_peft_model(_biased_llama(), **kwargs)
    theirs = peft.get_peft_model(_biased_llama(), peft.LoraConfig(**kwargs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable == {n for n, p in theirs.named_parameters() if p.requires_grad and "lora_" not in n}
    _trained_and_read_both_ways(ours, theirs, _biased_llama, tmp_path)


def test_bias_all_means_parameters_named_bias_as_in_peft():
    cfg = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    torch.manual_seed(0)
    ours = lora_ext.get_peft_model(transformers.T5ForConditionalGeneration(cfg), r=4, target_modules=["q", "v"],
                                   bias="all")
    torch.manual_seed(0)
    theirs = peft.get_peft_model(transformers.T5ForConditionalGeneration(cfg),
                                 peft.LoraConfig(r=4, target_modules=["q", "v"], bias="all"))
    ours_trained = {n for n, p in ours.named_parameters() if p.requires_grad and "lora_" not in n}
    assert ours_trained == {n for n, p in theirs.named_parameters() if p.requires_grad and "lora_" not in n}
    assert not any("relative_attention_bias" in n for n in ours_trained)  # a weight, though 'bias' is in its name
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_nf4_parameter_count_does_not_depend_on_the_storage_dtype():
    counts = {st: lora_ext.get_peft_model(llama(), r=4, quantize_base="nf4", quant_storage=st)
              .get_nb_trainable_parameters() for st in (torch.uint8, torch.bfloat16, torch.float32)}
    assert len(set(counts.values())) == 1, counts
    assert counts[torch.uint8] == lora_ext.get_peft_model(llama(), r=4).get_nb_trainable_parameters()


def _roberta_classifier(seed=0):
    """Its head `classifier` is a block: two Linear layers (classifier.dense, classifier.out_proj)."""
    torch.manual_seed(seed)
    config = transformers.RobertaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=40, num_labels=3)
    return transformers.RobertaForSequenceClassification(config).eval()


def _peft_targets(peft_model):
    return sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer))


@pytest.mark.parametrize("make, config", [
    (llama_classifier, dict(target_modules="all-linear", modules_to_save=["score"])),
    (llama_classifier, dict(target_modules=["q_proj", "score"], modules_to_save=["score"])),
    (_roberta_classifier, dict(target_modules="all-linear", task_type="SEQ_CLS")),  # classifier.dense/out_proj
], ids=["all-linear", "named", "inside a block"])
def test_targets_in_modules_to_save_are_left_out_as_in_peft(tmp_path, make, config):
    """PEFT never adapts a modules_to_save module or one inside it (its _ExcludedModule): the module is trained
    in full instead. Its saved adapter lists such modules in target_modules (all-linear, expanded) and loads
    here with the same logits; ours loads there."""
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=4, **config))
    ours = lora_ext.get_peft_model(make(), r=4, **config)
    assert sorted(ours.lora_layers()) == _peft_targets(theirs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ids = torch.randint(3, 96, (2, 11), generator=torch.Generator().manual_seed(5))
    _perturb_trained(theirs)
    theirs.eval().save_pretrained(str(tmp_path / "theirs"))
    loaded = lora_ext.LoraModel.from_pretrained(make(), str(tmp_path / "theirs"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
    _perturb_trained(ours)
    ours.save_pretrained(str(tmp_path / "ours"))
    back = peft.PeftModel.from_pretrained(make(), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
