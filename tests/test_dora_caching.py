"""lora_ext.dora_caching(): with grad off, a DoRA layer's row norms are taken once and reused while A, B and W
are unchanged; any in-place change is seen. LoraModel.generate takes each layer's norm once per call. The
oracle is the same layer's output with nothing cached, computed after each change."""
import copy

import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import dora

from conftest import requires_c

pytestmark = requires_c


@pytest.fixture
def norm_calls(monkeypatch):
    calls = []
    real = dora.weight_norm

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dora, "weight_norm", counted)
    return calls


def _fresh(layer, x):
    """The layer's output (no cache outside dora_caching)."""
    with torch.no_grad():
        return layer(x)


def _dora_layer(base_kind: str) -> lora_ext.LoraLinear:
    """A DoRA layer (random B) over a dense or NF4 base of 24 x 40."""
    torch.manual_seed(0)
    base = nn.Linear(40, 24)
    if base_kind == "nf4":
        base = lora_ext.NF4Linear.from_linear(base, blocksize=64)
    return lora_ext.LoraLinear(base, r=4, lora_alpha=8, use_dora=True, init_lora_weights=False)


@pytest.mark.parametrize("base_kind", ["dense", "nf4"])
def test_norms_are_reused_while_nothing_changes_and_recomputed_after_any_change(base_kind, norm_calls):
    layer = _dora_layer(base_kind)
    x = torch.randn(3, 40)
    norm_calls.clear()  # (the magnitude's initialisation)
    changes = {"B in place": lambda: layer.lora_B.add_(0.05),
               "A loaded": lambda: layer.load_state_dict({**layer.state_dict(), "lora_A": torch.randn(4, 40)}),
               "scaling": lambda: setattr(layer, "scaling", layer.scaling * 1.5)}
    if base_kind == "dense":
        changes["W in place"] = lambda: layer.base_layer.weight.mul_(1.1)
    with lora_ext.dora_caching(), torch.no_grad():
        first = layer(x)
        assert len(norm_calls) == 1
        assert torch.equal(layer(x), first) and len(norm_calls) == 1
        with lora_ext.dora_caching():  # nested: the same norms
            assert torch.equal(layer(x), first) and len(norm_calls) == 1
        for what, change in changes.items():
            before, calls = layer(x), len(norm_calls)
            change()
            after = layer(x)
            assert len(norm_calls) == calls + 1 and not torch.equal(after, before), what
            # The oracle: a copy of the layer as it is now (another layer: nothing cached for it yet).
            assert torch.equal(after, copy.deepcopy(layer)(x)), what
            assert torch.equal(layer(x), after) and len(norm_calls) == calls + 2, what  # (+1: the copy's)
        calls = len(norm_calls)
        with torch.enable_grad():  # training inside the context: no cache
            layer(x)
            layer(x)
        assert len(norm_calls) == calls + 2
    calls = len(norm_calls)
    _fresh(layer, x)
    _fresh(layer, x)
    assert len(norm_calls) == calls + 2  # the norms went with the context


def test_generate_takes_each_layers_norm_once_and_the_same_tokens(norm_calls):
    from hf_models import llama, randomize_adapters, token_ids

    model = lora_ext.get_peft_model(llama(), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                    use_dora=True)
    randomize_adapters(model)
    ids = token_ids()
    norm_calls.clear()
    new = 6
    uncached = model.base_model.model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    per_pass = len(norm_calls) // new
    assert per_pass == len(model.lora_layers()) == 6 and len(norm_calls) == new * per_pass
    norm_calls.clear()
    cached = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    assert len(norm_calls) == per_pass
    assert torch.equal(cached, uncached)


def test_a_new_adapter_at_a_freed_ones_address_and_version_is_not_taken_for_it():
    """An allocator hands a deleted adapter's memory to the next one of its size (delete_adapter, then
    load_adapter): address, version, shape and dtype may all match. Here both adapters are views of one buffer
    (a view shares its base's version counter), the second written without a version bump."""
    torch.manual_seed(0)
    layer = lora_ext.LoraLinear(nn.Linear(40, 24), r=4, lora_alpha=8, use_dora=True, init_lora_weights=False)
    x = torch.randn(3, 40)
    buffer = layer.lora_A.detach().clone().reshape(-1)
    first = nn.Parameter(buffer.view(4, 40))
    with lora_ext.dora_caching(), torch.no_grad():
        layer.set_adapter_weights(first, layer.lora_B, layer.lora_alpha, False, 0.0)
        layer(x)
        buffer.data.copy_(torch.randn(160))  # (through .data: no version bump)
        second = nn.Parameter(buffer.view(4, 40))
        assert (second.data_ptr(), second._version) == (first.data_ptr(), first._version)
        layer.set_adapter_weights(second, layer.lora_B, layer.lora_alpha, False, 0.0)
        assert torch.equal(layer(x), copy.deepcopy(layer)(x))


@pytest.mark.parametrize("base_kind", ["dense", "nf4"])
def test_inference_mode_tensors_which_have_no_version_are_never_cached(base_kind, norm_calls):
    """A model built, or an adapter loaded, under torch.inference_mode has tensors without a version counter:
    nothing keyed on them is cached, and the output is the no_grad twin's."""
    twin = _dora_layer(base_kind)
    x = torch.randn(3, 40)
    expected = _fresh(twin, x)
    with torch.inference_mode():
        layer = copy.deepcopy(twin)
        layer.lora_A, layer.lora_B = nn.Parameter(twin.lora_A.clone()), nn.Parameter(twin.lora_B.clone())
        assert layer.lora_A.is_inference()
        norm_calls.clear()
        with lora_ext.dora_caching():
            for _ in range(2):
                assert torch.equal(layer(x), expected)
        assert len(norm_calls) == 2
