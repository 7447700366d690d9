"""Many adapters in one batch (PEFT's `adapter_names`): each row runs with its own adapter, "__base__" with
none. Against PEFT's own mixed batches over the same PEFT-saved adapters, and against each row run alone."""
import pytest
import torch

import lora_ext

from conftest import requires_c

pytestmark = requires_c
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_models import llama  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
ADAPTERS = {"a": dict(r=4, lora_alpha=8), "b": dict(r=8, lora_alpha=32, use_rslora=True),
            "c": dict(r=2, lora_alpha=4, rank_pattern={"down_proj": 6})}
NAMES = ["a", "b", "__base__", "b", "a", "c", "__base__"]


def _ids(rows):
    return torch.randint(0, 96, (rows, 9), generator=torch.Generator().manual_seed(rows))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Three PEFT adapters of one base, with their own ranks, alphas, rsLoRA and patterns."""
    root = tmp_path_factory.mktemp("adapters")
    for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed)
        model = peft.get_peft_model(llama(), peft.LoraConfig(target_modules=TARGETS, init_lora_weights=False,
                                                             **kwargs))
        model.save_pretrained(str(root / name))
    return root


def _ours(saved, **kwargs):
    model = lora_ext.LoraModel.from_pretrained(llama(), str(saved / "a"), adapter_name="a", **kwargs)
    for name in ("b", "c"):
        model.load_adapter(str(saved / name), name)
    return model.eval()


def _alone(model, ids, names):
    """Each row run by itself with its adapter set (the base alone for "__base__")."""
    rows, active = [], model.active_adapter
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                rows.append(model(ids[i:i + 1]).logits)
        else:
            model.set_adapter(name)
            rows.append(model(ids[i:i + 1]).logits)
    model.set_adapter(active)
    return torch.cat(rows)


def test_mixed_batch_equals_peft_and_each_row_alone(saved):
    ids = _ids(len(NAMES))
    ours = _ours(saved)
    theirs = peft.PeftModel.from_pretrained(llama(), str(saved / "a"), adapter_name="a")
    for name in ("b", "c"):
        theirs.load_adapter(str(saved / name), name)
    theirs.eval()
    with torch.no_grad():
        mixed = ours(input_ids=ids, adapter_names=NAMES).logits
        torch.testing.assert_close(mixed, theirs(input_ids=ids, adapter_names=NAMES).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed, _alone(ours, ids, NAMES), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(mixed[0], mixed[1], atol=1e-3)  # the adapters differ
    assert ours.active_adapter == "a"  # the batch leaves the model as it was


@pytest.mark.parametrize("names", [["b"], ["c"] * 4, ["__base__", "__base__"]])
def test_one_row_and_one_adapter_for_all(saved, names):
    ids = _ids(len(names))
    ours = _ours(saved)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, adapter_names=names).logits, _alone(ours, ids, names), rtol=1e-5,
                                   atol=1e-5)


def test_nf4_base_and_generate(saved):
    ours = _ours(saved, quantize_base="nf4")
    prompts = _ids(4)
    names = ["c", "__base__", "a", "b"]
    with torch.no_grad():
        torch.testing.assert_close(ours(prompts, adapter_names=names).logits, _alone(ours, prompts, names),
                                   rtol=1e-5, atol=1e-5)
        out = ours.generate(input_ids=prompts, adapter_names=names, max_new_tokens=5, do_sample=False,
                            pad_token_id=0)
        for i, name in enumerate(names):
            if name == "__base__":
                with ours.disable_adapter():
                    alone = ours.generate(input_ids=prompts[i:i + 1], max_new_tokens=5, do_sample=False,
                                          pad_token_id=0)
            else:
                ours.set_adapter(name)
                alone = ours.generate(input_ids=prompts[i:i + 1], max_new_tokens=5, do_sample=False, pad_token_id=0)
            assert torch.equal(out[i:i + 1], alone), name


@pytest.mark.parametrize("beams", [dict(num_beams=3), dict(num_beams=2, num_return_sequences=2)])
def test_encoder_decoder_beam_search_generates_peft_tokens(tmp_path, beams):
    """T5 with beams: the encoder sees each prompt once, the decoder each prompt's beams; both runs of a layer
    take the names' rows in contiguous blocks, and the tokens are PEFT's."""
    from hf_models import t5

    theirs = peft.get_peft_model(t5(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"],
                                                       init_lora_weights=False))
    theirs.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=8, target_modules=["q", "v"], init_lora_weights=False))
    theirs.save_pretrained(str(tmp_path))
    ours = lora_ext.LoraModel.from_pretrained(t5(), str(tmp_path))
    ours.load_adapter(str(tmp_path / "b"), "b")
    prompts = torch.randint(2, 96, (3, 7), generator=torch.Generator().manual_seed(0))
    kwargs = dict(adapter_names=["default", "b", "__base__"], max_new_tokens=5, do_sample=False,
                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=None, **beams)
    with torch.no_grad():
        assert torch.equal(ours.eval().generate(input_ids=prompts, **kwargs),
                           theirs.eval().generate(input_ids=prompts, **kwargs))


def test_gpt2_conv1d_and_modules_to_save(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    model = lora_ext.get_peft_model(transformers.GPT2LMHeadModel(cfg), r=4, target_modules=["c_attn", "c_fc"],
                                    init_lora_weights=False, modules_to_save=["lm_head"])
    model.add_adapter("second", r=6, lora_alpha=3, modules_to_save=["lm_head"])
    model.set_adapter("second")
    with torch.no_grad():
        for layer in model.lora_layers().values():
            layer.lora_B.normal_(0, 0.1)
        model.saved_modules()["lm_head"].modules_to_save["second"].weight.mul_(1.5)
    model.set_adapter("default")
    model.eval()
    names = ["second", "default", "__base__"]
    ids = _ids(3)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, adapter_names=names).logits, _alone(model, ids, names), rtol=1e-5,
                                   atol=1e-5)


def test_bad_adapter_names_are_refused_by_name(saved):
    ours = _ours(saved)
    ids = _ids(3)
    with pytest.raises(ValueError, match=r"adapters this model does not have: \['d'\]; adapters: \['a', 'b', 'c'\]"):
        ours(ids, adapter_names=["a", "d", "b"])
    with pytest.raises(ValueError, match="adapter_names has 2 entries for a batch of 3 rows"):
        ours(ids, adapter_names=["a", "b"])
    with pytest.raises(TypeError, match="adapter_names must be a list"):
        ours(ids, adapter_names="a")
    ours.train()
    with pytest.raises(ValueError, match="mixed-adapter batches are for inference"):
        ours(ids, adapter_names=["a", "b", "c"])
    ours.eval()
    ours.merge_adapter()
    with pytest.raises(RuntimeError, match="merged into the base"):
        ours(ids, adapter_names=["a", "b", "c"])
    ours.unmerge_adapter()
    with torch.no_grad():  # and the model still runs as it did
        torch.testing.assert_close(ours(ids, adapter_names=["a", "a", "a"]).logits, ours(ids).logits, rtol=0,
                                   atol=0)


@pytest.fixture(scope="module")
def different_targets(tmp_path_factory):
    """Two PEFT adapters of one base with different targets and ranks: the second also adapts the MLP."""
    root = tmp_path_factory.mktemp("targets")
    for seed, (name, targets, r) in enumerate([("first", ["q_proj", "v_proj"], 4),
                                               ("second", ["q_proj", "v_proj", "down_proj", "gate_proj"], 6)]):
        torch.manual_seed(10 + seed)
        model = peft.get_peft_model(llama(), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                             init_lora_weights=False))
        model.save_pretrained(str(root / name))
    theirs = peft.PeftModel.from_pretrained(llama(), str(root / "first"), adapter_name="first")
    theirs.load_adapter(str(root / "second"), "second")
    return root, theirs.eval()


def test_adapters_with_different_targets_side_by_side(different_targets, tmp_path):
    root, theirs = different_targets
    ours = lora_ext.LoraModel.from_pretrained(llama(), str(root / "first"), adapter_name="first").eval()
    first = {n: m.lora_A for n, m in ours.lora_layers().items()}
    ours.load_adapter(str(root / "second"), "second")
    layers = ours.lora_layers()
    assert layers["model.layers.1.mlp.down_proj"].lora_A is None  # "first" does not reach the MLP
    assert all(layers[n].lora_A is A for n, A in first.items())  # loading "second" left "first" as it was
    ids = _ids(4)
    names = ["second", "first", "__base__", "second"]
    with torch.no_grad():
        for name in ("first", "second", "first"):
            ours.set_adapter(name)
            theirs.set_adapter(name)
            torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(ids, adapter_names=names).logits,
                                   theirs(input_ids=ids, adapter_names=names).logits, rtol=1e-5, atol=1e-5)
        ours.set_adapter("second")
        expected = ours(ids).logits
        ours.merge_adapter()
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-4, atol=1e-4)
        ours.unmerge_adapter()
    ours.save_pretrained(str(tmp_path))  # "first" would go to tmp_path/first: only the default name is at the root
    for name in ("first", "second"):
        reloaded = peft.PeftModel.from_pretrained(llama(), str(tmp_path / name)).eval()
        theirs.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
    ours.set_adapter("first")
    ours.delete_adapter("second")
    ours.load_adapter(str(root / "second"), "first")  # under the active name, other targets: replaces it
    theirs.set_adapter("second")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
    assert sorted(ours.peft_config) == ["first"] and ours.peft_config["first"].r == 6


def _count_operator_calls(monkeypatch):
    from lora_ext import multi_lora

    calls = []
    real = multi_lora.ops.multi_lora_forward_
    monkeypatch.setattr(multi_lora.ops, "multi_lora_forward_", lambda *a: calls.append(1) or real(*a))
    return calls


def test_sixty_four_adapters_in_one_batch_through_the_operator(monkeypatch):
    """64 adapters of ranks 1..8 and alphas of their own, one row each plus a base row, in one batch: each
    layer makes one call of the mixed-batch operator, and every row equals its adapter run alone."""
    torch.manual_seed(0)
    model = lora_ext.get_peft_model(llama(), r=4, target_modules=TARGETS, init_lora_weights=False,
                                    adapter_name="a0")
    for i in range(1, 64):
        model.add_adapter(f"a{i}", r=1 + i % 8, lora_alpha=2 + i % 5, init_lora_weights=False)
    model.eval()
    names = [f"a{i}" for i in torch.randperm(64).tolist()] + ["__base__"]
    ids = _ids(len(names))
    calls = _count_operator_calls(monkeypatch)
    with torch.no_grad():
        mixed = model(ids, adapter_names=names).logits
    assert len(calls) == len(model.lora_layers())
    with torch.no_grad():
        torch.testing.assert_close(mixed, _alone(model, ids, names), rtol=1e-5, atol=1e-5)


def test_with_gradients_on_rows_go_through_the_differentiable_operator(saved, monkeypatch):
    """Grad mode on (eval, no torch.no_grad()): the same logits, and the active adapter's gradient is the
    one its own rows give run alone (the operator computes no gradient, so it must not be used)."""
    ours = _ours(saved, is_trainable=True)
    ids = _ids(len(NAMES))
    calls = _count_operator_calls(monkeypatch)
    mixed = ours(input_ids=ids, adapter_names=NAMES).logits
    assert not calls
    with torch.no_grad():
        torch.testing.assert_close(mixed, ours(input_ids=ids, adapter_names=NAMES).logits, rtol=1e-6, atol=1e-6)
    layer = ours.lora_layers()["model.layers.0.self_attn.q_proj"]
    mixed[[i for i, n in enumerate(NAMES) if n == "a"]].sum().backward()
    grad_mixed = layer.lora_B.grad.clone()
    layer.lora_B.grad = None
    rows = [i for i, n in enumerate(NAMES) if n == "a"]
    ours(ids[rows]).logits.sum().backward()
    torch.testing.assert_close(grad_mixed, layer.lora_B.grad, rtol=1e-5, atol=1e-6)
