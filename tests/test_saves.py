"""Saves that a kill cannot leave half written (lora_ext/atomic.py), and loads that refuse a damaged
adapter with a clear error and leave the model as it was."""
import json
import os
import random
import signal
import time

import pytest
import torch

import lora_ext
from lora_ext import atomic

from conftest import requires_c

pytestmark = requires_c
transformers = pytest.importorskip("transformers")

from hf_models import llama, token_ids  # noqa: E402

KILLS = 24


def _big_adapter():
    """4 layers, r = 64 on every Linear: a save of some megabytes, long enough to be killed inside."""
    model = llama(hidden_size=128, intermediate_size=256, num_hidden_layers=4)
    return lora_ext.get_peft_model(model, r=64, lora_alpha=64, target_modules="all-linear")


def _version(directory):
    """The one value every lora_B of a saved adapter holds (its save's number), and its config's alpha,
    which the saver sets to the same number."""
    config, weights = lora_ext.LoraModel._read_adapter(directory)[:2]
    values = {v.flatten()[0].item() for k, v in weights.items() if k.endswith("lora_B.weight")}
    assert len(values) == 1 and all(torch.all(v == v.flatten()[0]) for k, v in weights.items()
                                    if k.endswith("lora_B.weight")), "tensors from two saves"
    version = values.pop()
    assert config.lora_alpha == version, f"config of save {config.lora_alpha}, tensors of save {version}"
    return version


def _saver(model, directory, first, done_fd):
    """The child: saves versions first, first + 1, ... to the same directory until killed, writing a byte to
    done_fd after each."""
    version = first
    while True:
        _saver_once(model, directory, version)
        os.write(done_fd, b".")
        version += 1


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_save_killed_at_any_moment_leaves_the_old_adapter_or_the_new(tmp_path, monkeypatch, exchange):
    """SIGKILL at 24 moments of saves in a loop into one directory: it always loads whole, as one save's
    tensors with that save's config, never older than what was there (both ways of switching it in)."""
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # the forked saver inherits it
    model = _big_adapter()
    directory = str(tmp_path / "adapter")
    t0 = time.perf_counter()
    _saver_once(model, directory, 1)
    save_s = time.perf_counter() - t0
    rng = random.Random(7)
    last = 1
    for kill in range(KILLS):
        done_r, done_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child saves in a loop until the parent kills it
            try:
                os.close(done_r)
                _saver(model, directory, last + 1, done_w)
            finally:
                os._exit(0)
        os.close(done_w)
        if kill % 2:  # every other kill lands in a later save, after one completed (however slow the machine)
            os.read(done_r, 1)
        time.sleep(rng.uniform(0.0, 2 * save_s))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(done_r)
        version = _version(directory)  # loads whole: one save's tensors with that save's config
        assert version >= last, (version, last)
        last = version
        leftovers = [e for e in os.listdir(tmp_path) if e not in ("adapter", "adapter.old")]
        assert all(e.startswith(".adapter.tmp-") for e in leftovers), leftovers
    assert last > 1  # some saves completed between the kills
    print(f"{KILLS} kills, {last - 1} saves completed, one save {save_s * 1e3:.0f} ms")
    fresh = lora_ext.LoraModel.from_pretrained(llama(hidden_size=128, intermediate_size=256, num_hidden_layers=4),
                                               directory)
    assert fresh.lora_layers()["model.layers.3.mlp.down_proj"].lora_B.flatten()[0].item() == last
    _saver_once(model, directory, last + 1)  # a later save clears what the killed ones left
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def _saver_once(model, directory, version):
    with torch.no_grad():
        for layer in model.lora_layers().values():
            layer.lora_B.fill_(version)
    model.peft_config["default"].lora_alpha = version
    model.save_pretrained(directory)


def test_a_save_keeps_what_else_the_directory_holds(tmp_path):
    """Another adapter's subdirectory and the user's own files survive a save of the default adapter, and
    a file linked into the new directory is replaced, never written through."""
    model = _big_adapter()
    model.add_adapter("second", r=4)
    model.save_pretrained(str(tmp_path))
    (tmp_path / "README.md").write_text("notes")
    before = (tmp_path / "second" / "adapter_model.safetensors").read_bytes()
    weights_before = (tmp_path / "adapter_model.safetensors").read_bytes()
    kept = open(tmp_path / "adapter_model.safetensors", "rb")  # a reader holding the old file
    with torch.no_grad():
        for layer in model.lora_layers().values():
            layer.lora_B.fill_(3.0)
    model.save_pretrained(str(tmp_path), selected_adapters=["default"])
    assert (tmp_path / "README.md").read_text() == "notes"
    assert (tmp_path / "second" / "adapter_model.safetensors").read_bytes() == before
    assert kept.read() == weights_before  # the old inode was not overwritten
    kept.close()
    assert (tmp_path / "adapter_model.safetensors").read_bytes() != weights_before


def test_a_killed_directory_swap_is_read_from_its_old_copy(tmp_path):
    """Where the filesystem cannot exchange two directories in one step, a kill between the two renames
    leaves <dir>.old and no <dir>: the loaders read <dir>.old."""
    model = _big_adapter()
    directory = tmp_path / "adapter"
    _saver_once(model, str(directory), 5)
    os.rename(directory, str(directory) + ".old")
    assert _version(str(directory)) == 5
    _saver_once(model, str(directory), 6)
    assert _version(str(directory)) == 6 and not os.path.exists(str(directory) + ".old")


def test_single_files_are_replaced_whole(tmp_path):
    path = str(tmp_path / "state.pt")
    atomic.write_file(path, lambda tmp: torch.save({"a": 1}, tmp))

    def failing(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic.write_file(path, failing)
    assert torch.load(path) == {"a": 1} and os.listdir(tmp_path) == ["state.pt"]


# ---------------------------------------------------------------- damaged adapters change nothing


def _saved(tmp_path):
    model = lora_ext.get_peft_model(llama(), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model.save_pretrained(str(tmp_path))
    return tmp_path


def _retype(tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    path = str(tmp_path / "adapter_model.safetensors")
    weights = load_file(path)
    save_file({k: v.to(dtype) if "lora_A" in k else v for k, v in weights.items()}, path)


def _break_config(tmp_path, edit):
    path = tmp_path / "adapter_config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("damage, error, message", [
    (lambda d: (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:100]),
     ValueError, "is not a readable safetensors file"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b""), ValueError, "is not a readable safetensors file"),
    (lambda d: (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4'), ValueError,
     "is not valid JSON"),
    (lambda d: _break_config(d, lambda c: c.pop("target_modules")), ValueError, r"missing \['target_modules'\]"),
    (lambda d: _break_config(d, lambda c: c.update(use_dora=True)), ValueError,
     r"keys do not match the model: missing \['model.layers.0.self_attn.q_proj.lora_magnitude_vector'"),
    (lambda d: _break_config(d, lambda c: c.update(exclude_modules=["q_proj"], future_field=None)), ValueError,
     r"exclude_modules=\['q_proj'\] is not supported"),
    (lambda d: _break_config(d, lambda c: c.update(rank_pattern={"q_proj": "x"})), ValueError,
     r"rank_pattern\['q_proj'\] must be an integer >= 1"),
    (lambda d: _break_config(d, lambda c: c.update(r=8)), ValueError, r"has shape \(4, 64\), the model needs \(8, 64\)"),
    (lambda d: (d / "adapter_config.json").unlink(), FileNotFoundError, "adapter file not found"),
    (lambda d: (d / "adapter_model.safetensors").unlink(), FileNotFoundError,
     r"adapter file not found: .*adapter_model.safetensors \(nor adapter_model.bin beside it\)"),
    # every field checked before anything changes, named with the file (none coerced: "false" is not False)
    (lambda d: _break_config(d, lambda c: c.update(lora_alpha="8")), ValueError,
     r"adapter_config.json: lora_alpha must be a number >= 0, got '8'"),
    (lambda d: _break_config(d, lambda c: c.update(lora_alpha=None)), ValueError,
     "lora_alpha must be a number >= 0, got None"),
    (lambda d: _break_config(d, lambda c: c.update(lora_dropout=1.5)), ValueError,
     r"adapter_config.json: lora_dropout must be a number in \[0, 1\), got 1.5"),
    (lambda d: _break_config(d, lambda c: c.update(lora_dropout=-0.1)), ValueError,
     r"lora_dropout must be .* got -0.1"),
    (lambda d: _break_config(d, lambda c: c.update(use_rslora="false")), ValueError,
     "use_rslora must be True or False, got 'false'"),
    (lambda d: _break_config(d, lambda c: c.update(use_dora="false")), ValueError,
     "use_dora must be True or False, got 'false'"),
    (lambda d: _break_config(d, lambda c: c.update(r="4")), ValueError, "r must be an integer >= 1, got '4'"),
    (lambda d: _break_config(d, lambda c: c.update(target_modules=None)), ValueError,
     r"target_modules must be a regular expression \(str\) or a list of module names, got None"),
    (lambda d: _break_config(d, lambda c: c.update(layers_to_transform="1")), ValueError,
     "layers_to_transform must be None, a layer index or a list of them, got '1'"),
    (lambda d: _break_config(d, lambda c: c.update(modules_to_save="lm_head")), ValueError,
     "modules_to_save must be None or a list of module names, got 'lm_head'"),
    (lambda d: _break_config(d, lambda c: c.update(target_modules=".*q_proj", layers_to_transform=[0])), ValueError,
     "adapter_config.json: `layers_to_transform` cannot be used when `target_modules` is a str."),  # PEFT's words
    (lambda d: _retype(d, torch.int32), ValueError, r"lora_A.weight is torch.int32, expected a floating-point"),
])
def test_a_damaged_adapter_is_refused_and_the_model_unchanged(tmp_path, damage, error, message):
    damage(_saved(tmp_path))
    target = lora_ext.get_peft_model(llama(), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for layer in target.lora_layers().values():
            layer.lora_B.normal_()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    ids = token_ids()
    logits = target(ids).logits
    for load in (lambda: target.load_adapter(str(tmp_path), "default"),
                 lambda: target.load_adapter(str(tmp_path), "other")):
        with pytest.raises(error, match=message):
            load()
    after = target.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert list(target.peft_config) == ["default"]
    torch.testing.assert_close(target(ids).logits, logits, rtol=0, atol=0)
    fresh = llama()
    with pytest.raises(error, match=message):
        lora_ext.LoraModel.from_pretrained(fresh, str(tmp_path))
    assert not any(isinstance(m, lora_ext.LoraLinear) for m in fresh.modules())
    assert all(p.requires_grad for p in fresh.parameters())  # not even frozen


def test_peft_bin_adapter_loads_with_the_same_logits(tmp_path):
    """PEFT's save_pretrained(safe_serialization=False) writes adapter_model.bin: read as PEFT reads it."""
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False)).eval()
    theirs.save_pretrained(str(tmp_path), safe_serialization=False)
    assert not (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "adapter_model.bin").exists()
    ids = token_ids()
    with torch.no_grad():
        expected = theirs(ids).logits
        loaded = lora_ext.LoraModel.from_pretrained(llama(), str(tmp_path))
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
        second = lora_ext.get_peft_model(llama(), r=2, target_modules=["k_proj"])
        second.load_adapter(str(tmp_path), "bin")
        second.set_adapter("bin")
        torch.testing.assert_close(second(ids).logits, expected, rtol=1e-5, atol=1e-5)
    (tmp_path / "adapter_model.bin").write_bytes(b"not a pickle")
    fresh = llama()
    with pytest.raises(ValueError, match="adapter_model.bin is not a readable PyTorch file"):
        lora_ext.LoraModel.from_pretrained(fresh, str(tmp_path))
    assert not any(isinstance(m, lora_ext.LoraLinear) for m in fresh.modules())


def test_an_adapter_for_another_architecture_is_refused(tmp_path):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4,
                                                                n_positions=64))
    lora_ext.get_peft_model(gpt2, r=4, target_modules=["c_attn"]).save_pretrained(str(tmp_path))
    model = llama()
    with pytest.raises(ValueError, match=r"target_modules \['c_attn'\] matches no Linear module"):
        lora_ext.LoraModel.from_pretrained(model, str(tmp_path))
    assert not any(isinstance(m, lora_ext.LoraLinear) for m in model.modules())
