"""DoRA in one layer (LoraLinear(..., use_dora=True)): against PEFT's own DoRA layer (outputs and the gradients
of A, B and the magnitude), against fp64 formulas (the row norms without the out x in matrix, dropout in
training), gradcheck; no out x in tensor kept for backward (PEFT keeps one); merge keeps the function."""
import copy

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import lora_ext
from lora_ext import dora
from lora_ext import reference as R

from conftest import requires_c

pytestmark = requires_c
peft = pytest.importorskip("peft")


class _Holder(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def _pair(base: nn.Module, r=4, alpha=8, dropout=0.0, rslora=False):
    """PEFT's DoRA layer over a copy of base (random B, as after training) and ours with the same A, B and a
    magnitude moved off its initial value, so every term of the output counts."""
    torch.manual_seed(1)
    theirs = peft.get_peft_model(_Holder(copy.deepcopy(base)), peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=["proj"], use_dora=True, init_lora_weights=False, lora_dropout=dropout,
        use_rslora=rslora)).base_model.model.proj
    ours = lora_ext.LoraLinear(copy.deepcopy(base), r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora,
                               use_dora=True)
    with torch.no_grad():
        ours.lora_A.copy_(theirs.lora_A["default"].weight)
        ours.lora_B.copy_(theirs.lora_B["default"].weight)
        m = theirs.lora_magnitude_vector["default"].weight
        torch.testing.assert_close(dora.init_magnitude(ours._base_weight(), ours.lora_A, ours.lora_B, ours.scaling,
                                                       torch.float32), m, rtol=1e-5, atol=1e-6)
        m.mul_(torch.linspace(0.5, 1.5, m.numel()))
        ours.lora_magnitude_vector.copy_(m)
    return ours, theirs


def _grads(layer, names):
    return [dict(layer.named_parameters())[n].grad for n in names]


@pytest.mark.parametrize("kind", ["linear", "no bias", "rslora", "conv1d"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_layer_equals_peft(kind, mode):
    """Outputs and the gradients of A, B and m equal PEFT's (train mode without dropout runs the same math)."""
    if kind == "conv1d":
        transformers = pytest.importorskip("transformers")
        base = transformers.pytorch_utils.Conv1D(24, 40)  # (out, in): GPT-2's transposed weight
        nn.init.normal_(base.weight)
    else:
        base = nn.Linear(40, 24, bias=kind != "no bias")
    ours, theirs = _pair(base, rslora=kind == "rslora")
    ours.train(mode == "train")
    theirs.train(mode == "train")
    x = torch.randn(3, 7, 40, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y_peft = ours(x), theirs(x2)
    torch.testing.assert_close(y, y_peft, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_peft.backward(dy)
    ours_g = _grads(ours, ["lora_A", "lora_B", "lora_magnitude_vector"])
    theirs_g = _grads(theirs, ["lora_A.default.weight", "lora_B.default.weight",
                               "lora_magnitude_vector.default.weight"])
    for name, a, b in zip(("A", "B", "m"), ours_g, theirs_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item(), msg=name)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


def test_nf4_base_equals_peft_over_the_same_quantized_weight():
    """QDoRA: ours over NF4Linear against PEFT's DoRA over an nn.Linear holding the dequantized weight."""
    dense = nn.Linear(128, 48)
    nf4 = lora_ext.NF4Linear.from_linear(dense, blocksize=64)
    same = nn.Linear(128, 48)
    with torch.no_grad():
        same.weight.copy_(nf4.dequantize(torch.float32))
        same.bias.copy_(dense.bias)
    ours_ref, theirs = _pair(same)
    ours = lora_ext.LoraLinear(nf4, r=4, lora_alpha=8, use_dora=True)
    ours.load_state_dict({**ours_ref.state_dict(), **{f"base_layer.{k}": v for k, v in nf4.state_dict().items()}})
    x = torch.randn(5, 128)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    ours(x).sum().backward()
    theirs(x).sum().backward()
    torch.testing.assert_close(ours.lora_magnitude_vector.grad, theirs.lora_magnitude_vector["default"].weight.grad,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_f, in_f, r", [(1, 1, 1), (37, 129, 5), (300, 70, 16)])
def test_row_norms_without_the_matrix_against_fp64(dtype, out_f, in_f, r):
    W = torch.randn(out_f, in_f).to(dtype)
    A, B = torch.randn(r, in_f), torch.randn(out_f, r)
    exact = (W.double() + 0.7 * B.double() @ A.double()).norm(dim=1)
    torch.testing.assert_close(dora.weight_norm(W, A, B, 0.7).double(), exact, rtol=1e-5, atol=1e-5)
    if in_f % 64 == 0 or out_f * in_f % 64 == 0:
        qw = lora_ext.quantize_nf4(W, 64)
        exact = (qw.dequantize(torch.float32).double() + 0.7 * B.double() @ A.double()).norm(dim=1)
        torch.testing.assert_close(dora.weight_norm(qw, A, B, 0.7).double(), exact, rtol=1e-5, atol=1e-5)


def test_dropout_in_training_follows_peft_formula_in_fp64():
    """With dropout active: base(x) + (g - 1) xd W^T + g s xd A^T B^T on the dropped-out xd (PEFT's form), with
    our Philox mask (the seed drawn from torch's generator, as the layer draws it)."""
    ours, _ = _pair(nn.Linear(40, 24), dropout=0.3)
    ours.train()
    x = torch.randn(6, 40)
    torch.manual_seed(5)
    y = ours(x)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    W, b = ours.base_layer.weight.double(), ours.base_layer.bias.double()
    A, B, m = ours.lora_A.double(), ours.lora_B.double(), ours.lora_magnitude_vector.double()
    xd = R.lora_dropout(x.double(), 0.3, seed)
    g = m / (W + ours.scaling * B @ A).norm(dim=1)
    exact = x.double() @ W.t() + b + (g - 1) * (xd @ W.t()) + g * ours.scaling * (xd @ A.t() @ B.t())
    torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5)


def test_gradcheck_in_fp64():
    """The layer's gradients in fp64, with the row norm held constant as DoRA detaches it (section 4.3)."""
    layer = lora_ext.LoraLinear(nn.Linear(9, 7).double(), r=3, lora_alpha=6, use_dora=True,
                                adapter_dtype=torch.float64, init_lora_weights=False)
    norm = layer.dora_weight_norm().double()
    layer.dora_weight_norm = lambda: norm  # the instance's norm: constant while gradcheck perturbs A and B

    def f(x, A, B, m):
        with torch.nn.utils.stateless._reparametrize_module(layer, {"lora_A": A, "lora_B": B,
                                                                    "lora_magnitude_vector": m}):
            return layer(x)

    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True)
              for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)]
    assert torch.autograd.gradcheck(f, (x, *params))


class _NewTensors(TorchDispatchMode):
    """The element count of every tensor an op creates (outputs that alias an input's storage are views)."""

    def __init__(self):
        super().__init__()
        self.created = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.created.append((t.numel(), str(func)))
        return out


def _largest_new_tensor(fn):
    with _NewTensors() as mode:
        fn()
    return max(mode.created)


@pytest.mark.parametrize("base_kind", ["dense", "nf4"])
def test_no_out_by_in_tensor_in_forward_or_backward(base_kind, monkeypatch):
    """Forward and backward of 8 tokens through a 300 x 128 layer create no tensor of half its weight's elements
    (the base's constant row norms are taken a block of rows at a time); PEFT's DoRA builds B A and W + s B A."""
    monkeypatch.setattr(dora, "_ROW_BLOCK_ELEMENTS", 1024)
    ours, theirs = _pair(nn.Linear(128, 300))
    if base_kind == "nf4":  # double-quantized: its row blocks start on nested blocks, 128 rows here
        ours.base_layer = lora_ext.NF4Linear.from_linear(ours.base_layer, blocksize=64)
    x = torch.randn(8, 128, requires_grad=True)

    def step(layer):
        return lambda: layer(x).square().sum().backward()

    ours_largest, op = _largest_new_tensor(step(ours))
    assert ours_largest < 300 * 128 // 2, (ours_largest, op)
    theirs_largest, _ = _largest_new_tensor(step(theirs))
    assert theirs_largest >= 300 * 128  # the check can fail: PEFT's DoRA does create one


@pytest.mark.parametrize("kind", ["dense", "nf4", "conv1d"])
def test_merge_keeps_the_function_and_unmerge_restores(kind):
    if kind == "conv1d":
        transformers = pytest.importorskip("transformers")
        base = transformers.pytorch_utils.Conv1D(24, 64)
        nn.init.normal_(base.weight)
    else:
        base = nn.Linear(64, 24)
        if kind == "nf4":
            base = lora_ext.NF4Linear.from_linear(base, blocksize=64)
    layer = lora_ext.LoraLinear(base, r=4, lora_alpha=8, use_dora=True, init_lora_weights=False)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(torch.linspace(0.8, 1.2, 24))
    before_w = layer._weight_out_in().clone() if kind != "nf4" else base.weight.clone()
    W0 = (base.dequantize(torch.float32) if kind == "nf4" else layer._weight_out_in()).double()
    delta = layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    exact = (layer.lora_magnitude_vector.double() / (W0 + delta).norm(dim=1))[:, None] * (W0 + delta)
    x = torch.randn(5, 64)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        merged = layer(x)
        merged_w = layer._weight_out_in().clone() if kind != "nf4" else base.dequantize(torch.float32)
        report = layer.merge_error
        assert layer.merged
        layer.unmerge()
        back = layer(x)
    if kind == "nf4":  # 4-bit requantization of the exact W': its error is what merge_error reports
        err = (merged_w.double() - exact).abs().max().item()
        assert err == pytest.approx(report.max_abs, rel=1e-3)
        assert 0 < err < 0.2 * exact.abs().max().item()
        assert torch.equal(base.weight, before_w)  # unmerge: the original packed bytes, exactly
    else:
        torch.testing.assert_close(merged_w.double(), exact, rtol=1e-6, atol=1e-6 * exact.abs().max().item())
        torch.testing.assert_close(merged, y, rtol=1e-5, atol=1e-5 * y.abs().max().item())
        torch.testing.assert_close(layer._weight_out_in(), before_w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(back, y, rtol=1e-5, atol=1e-5)


def test_compiled_layer_sees_a_base_weight_changed_after_an_eager_forward():
    """A traced graph cannot tell the base weight the eager forward cached ||W_i||^2 for from a changed one
    (load_state_dict, an in-place update): compiled, the layer still equals PEFT's, which takes its norm anew."""
    ours, theirs = _pair(nn.Linear(40, 24))
    x = torch.randn(3, 40)
    ours(x)  # (eager: ||W_i||^2 cached)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    for factor in (2.0, 0.25):
        with torch.no_grad():
            for layer in (ours, theirs):
                layer.base_layer.weight.mul_(factor)
        torch.testing.assert_close(compiled(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_bad_use_dora_is_refused():
    with pytest.raises(TypeError, match="use_dora must be True or False"):
        lora_ext.LoraLinear(nn.Linear(8, 8), r=2, use_dora="yes")


# ---------------------------------------------------------------- models: get_peft_model, PEFT's format both ways

transformers = pytest.importorskip("transformers")
from hf_models import llama  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _ids(rows=3):
    return torch.randint(0, 96, (rows, 9), generator=torch.Generator().manual_seed(rows))


def _train_a_step(model):
    """One optimizer step, so B and the magnitude are not at their initial values."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = _ids(4)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def test_peft_reads_our_dora_adapter_and_we_read_peft(tmp_path):
    torch.manual_seed(0)
    ours = lora_ext.get_peft_model(llama(), r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True)
    _train_a_step(ours)
    ours.eval()
    ours.save_pretrained(str(tmp_path / "ours"))
    theirs = peft.PeftModel.from_pretrained(llama(), str(tmp_path / "ours")).eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
    # and the other way: PEFT's DoRA adapter (from a LoraConfig object), trained, saved, loaded by us
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                              use_dora=True, init_lora_weights=False))
    _train_a_step(peft_model)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    loaded = lora_ext.LoraModel.from_pretrained(llama(), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, peft_model.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    layer = loaded.lora_layers()["model.layers.0.self_attn.q_proj"]
    assert layer.use_dora and not layer.lora_magnitude_vector.requires_grad  # for inference, as PEFT's
    trainable = lora_ext.LoraModel.from_pretrained(llama(), str(tmp_path / "peft"), is_trainable=True)
    assert trainable.lora_layers()["model.layers.0.self_attn.q_proj"].lora_magnitude_vector.requires_grad


def test_a_peft_lora_config_object_with_use_dora():
    model = lora_ext.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=TARGETS, use_dora=True))
    assert all(m.use_dora for m in model.lora_layers().values())
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "lora_magnitude_vector"}


def test_qdora_over_nf4_equals_peft_over_the_same_dequantized_base(tmp_path):
    torch.manual_seed(0)
    ours = lora_ext.get_peft_model(llama(), r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True,
                                   quantize_base="nf4")
    _train_a_step(ours)
    ours.eval()
    ours.save_pretrained(str(tmp_path))
    dense = llama()
    dense.load_state_dict(ours.base_state_dict())  # the 4-bit weights, dequantized
    theirs = peft.PeftModel.from_pretrained(dense, str(tmp_path)).eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)
        expected = ours(ids).logits
        merged = ours.merge_and_unload(dequantize=True)
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_lora_and_dora_adapters_side_by_side(tmp_path):
    """PEFT's LoRA and DoRA adapters loaded beside each other: set_adapter switches with PEFT's logits, both
    save in PEFT's format, a new DoRA adapter starts as the base, mixed batches refuse DoRA names, deletes."""
    for seed, (name, use_dora) in enumerate([("plain", False), ("dora", True)]):
        torch.manual_seed(seed)
        model = peft.get_peft_model(llama(), peft.LoraConfig(r=4 + 2 * seed, lora_alpha=8, target_modules=TARGETS,
                                                             use_dora=use_dora, init_lora_weights=False))
        _train_a_step(model)
        model.save_pretrained(str(tmp_path / name))
    theirs = peft.PeftModel.from_pretrained(llama(), str(tmp_path / "plain"), adapter_name="plain")
    theirs.load_adapter(str(tmp_path / "dora"), "dora")
    theirs.eval()
    ours = lora_ext.LoraModel.from_pretrained(llama(), str(tmp_path / "plain"), adapter_name="plain")
    ours.load_adapter(str(tmp_path / "dora"), "dora")
    ours.eval()
    ids = _ids()
    with torch.no_grad():
        for name in ("dora", "plain", "dora"):
            ours.set_adapter(name)
            theirs.set_adapter(name)
            torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
        assert all(m.use_dora for m in ours.lora_layers().values())
        ours.save_pretrained(str(tmp_path / "ours"))  # default name absent: each adapter in its own folder
        for name in ("plain", "dora"):
            reread = peft.PeftModel.from_pretrained(llama(), str(tmp_path / "ours" / name)).eval()
            theirs.set_adapter(name)
            torch.testing.assert_close(reread(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match=r"do not take DoRA adapters .*\['dora'\]"):
            ours(ids, adapter_names=["plain", "dora", "__base__"])
        ours.set_adapter("dora")  # a batch that names no DoRA adapter runs beside an active one (PEFT's rule)
        theirs.set_adapter("dora")
        names = ["plain", "__base__", "plain"]
        torch.testing.assert_close(ours(ids, adapter_names=names).logits, theirs(ids, adapter_names=names).logits,
                                   rtol=1e-5, atol=1e-5)
        ours.set_adapter("plain")
        ours.add_adapter("fresh", r=2, use_dora=True)  # B = 0 and m = ||W||: the base's output
        ours.set_adapter("fresh")
        with ours.disable_adapter():
            base_logits = ours(ids).logits
        torch.testing.assert_close(ours(ids).logits, base_logits, rtol=1e-5, atol=1e-5)
    ours.delete_adapter("dora")
    assert sorted(ours.peft_config) == ["fresh", "plain"] and "dora" not in ours._stored_magnitudes
    with pytest.raises(TypeError, match="use_dora must be True or False"):
        lora_ext.get_peft_model(llama(), r=4, target_modules=TARGETS, use_dora=1)


def test_inactive_adapters_move_with_the_model(tmp_path):
    """.to(dtype) (and .to(device), .half() ...) converts the adapters kept beside the layers too, as PEFT's
    registered ones: set_adapter afterwards runs in the new dtype with PEFT's logits."""
    torch.manual_seed(0)
    base = llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                       use_dora=True, init_lora_weights=False))
    theirs.add_adapter("plain", peft.LoraConfig(r=2, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    theirs.save_pretrained(str(tmp_path))
    ours = lora_ext.LoraModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    ours.load_adapter(str(tmp_path / "plain"), "plain")
    ours.set_adapter("plain")  # the DoRA adapter, its magnitudes too, now kept beside the layers
    ours, theirs = ours.to(torch.float64).eval(), theirs.to(torch.float64).eval()
    ids = _ids()
    with torch.no_grad():
        for name in ("default", "plain"):
            ours.set_adapter(name)
            theirs.set_adapter(name)
            layer = ours.base_model.model.model.layers[0].self_attn.q_proj
            assert layer.lora_A.dtype == torch.float64
            assert name == "plain" or layer.lora_magnitude_vector.dtype == torch.float64
            torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)  # (norms fp32)


def test_qdora_equals_peft_over_bitsandbytes_4bit():
    """PEFT's DoRA over a bitsandbytes Linear4bit holding the same quantized weight (both quantize bit for bit
    alike). The rows are a multiple of the blocksize: bitsandbytes' CPU dequant is right only there (README)."""
    bnb = pytest.importorskip("bitsandbytes")
    from lora_ext.bench.peers import bnb_linear4bit

    dense = nn.Linear(128, 48)
    l4 = bnb_linear4bit(bnb, dense)
    ours = lora_ext.LoraLinear(lora_ext.NF4Linear.from_linear(dense, blocksize=64), r=4, lora_alpha=8, use_dora=True)
    assert torch.equal(ours.base_layer.qweight.packed.view(-1), l4.weight.data.view(-1))
    torch.manual_seed(1)
    theirs = peft.get_peft_model(_Holder(l4), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"],
                                                              use_dora=True, init_lora_weights=False))
    layer = theirs.base_model.model.proj
    with torch.no_grad():
        ours.lora_A.copy_(layer.lora_A["default"].weight)
        ours.lora_B.copy_(layer.lora_B["default"].weight)
        m0 = dora.init_magnitude(ours._base_weight(), ours.lora_A, ours.lora_B, ours.scaling, torch.float32)
        torch.testing.assert_close(m0, layer.lora_magnitude_vector["default"].weight, rtol=1e-5, atol=1e-5)
        ours.lora_magnitude_vector.copy_(layer.lora_magnitude_vector["default"].weight.mul_(1.2))
    x = torch.randn(6, 128)
    y, y_peft = ours(x), theirs(x)
    torch.testing.assert_close(y, y_peft, rtol=1e-4, atol=1e-4)
    y.square().sum().backward()
    y_peft.square().sum().backward()
    torch.testing.assert_close(ours.lora_magnitude_vector.grad, layer.lora_magnitude_vector["default"].weight.grad,
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.lora_B.grad, layer.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-4)
