"""`python -m lora_ext finetune`: the default run learns and writes an adapter PEFT loads; resume,
Ctrl-C, --merge, a local model with .jsonl data, and clear errors for bad arguments."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import lora_ext
from lora_ext.__main__ import main

from conftest import requires_c
from nf4_definition import dequantize_by_definition

pytestmark = requires_c
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--batch-size", "4", "--seq-len", "64", "--r", "8"]


def _summary(out):
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def _tiny_local_model(path, vocab=300):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(path))
    return str(path)


def _ids(vocab=259):
    return torch.randint(0, vocab, (2, 33), generator=torch.Generator().manual_seed(3))


def test_default_qlora_run_learns_and_peft_reads_the_adapter(tmp_path):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    out = str(tmp_path / "run")
    assert main(["finetune", "--steps", "40", "--out", out, *SMALL]) == 0
    s = _summary(out)
    held = list(s["held_out_loss"].values())
    assert s["steps"] == 40 and s["qlora"] and not s["interrupted"]
    assert held[-1] < held[0] - 0.5, held  # ln(259) = 5.56 at the start; bytes are far from uniform
    png = open(os.path.join(out, "loss.png"), "rb").read(8)
    assert png == b"\x89PNG\r\n\x1a\n"
    # PEFT over the saved base whose Linear weights went through bitsandbytes' NF4 quantizer (decoded by the
    # format's definition: its CPU dequant depends on the CPU) must give
    # the logits our QLoRA model gives.
    base = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "base_model"))
    with torch.no_grad():
        for name, m in base.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                packed, state = bnb_functional.quantize_4bit(m.weight.contiguous(), blocksize=64, quant_type="nf4",
                                                             compress_statistics=True)
                m.weight.copy_(dequantize_by_definition(packed, state))
    theirs = peft.PeftModel.from_pretrained(base, os.path.join(out, "adapter")).eval()
    ours = lora_ext.LoraModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "base_model")),
        os.path.join(out, "adapter"), quantize_base="nf4").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, theirs(_ids()).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sig, rc", [(signal.SIGINT, 0), (signal.SIGTERM, 128 + 15)])
def test_interrupted_then_resumed_equals_an_uninterrupted_run(tmp_path, monkeypatch, capsys, sig, rc):
    """Ctrl-C, or SIGTERM (what schedulers and `timeout` send; the run then exits non-zero), during a
    step: the step completes, everything is saved, and resuming gives the uninterrupted run's adapter."""
    model = _tiny_local_model(tmp_path / "model")
    from lora_ext.finetune.data import builtin_texts

    text = tmp_path / "text.txt"
    text.write_text(builtin_texts()[-1])
    common = ["--steps", "12", *SMALL]
    first_only = ["--model", model, "--no-qlora", "--data", str(text)]
    assert main(["finetune", "--out", str(tmp_path / "straight"), *first_only, *common]) == 0
    from lora_ext.finetune import data

    draw = data.Windows.batch
    calls = []

    def signal_during_the_sixth_step(self, batch_size):
        calls.append(1)
        if len(calls) == 6:
            signal.raise_signal(sig)  # lands mid-step: the step still completes
        return draw(self, batch_size)

    monkeypatch.setattr(data.Windows, "batch", signal_during_the_sixth_step)
    assert main(["finetune", "--out", str(tmp_path / "first"), *first_only, *common]) == rc
    monkeypatch.setattr(data.Windows, "batch", draw)
    first = _summary(tmp_path / "first")
    assert first["interrupted"] == sig.name and first["steps"] == 6
    err = capsys.readouterr().err
    assert f"interrupted at step 6 ({sig.name})" in err
    assert (f"stopped by SIGTERM after step 6; everything is saved, continue with --resume {tmp_path / 'first'}"
            in err) == (sig == signal.SIGTERM)
    # Resuming needs no --model, --no-qlora or --data: they come from the run it continues.
    assert main(["finetune", "--out", str(tmp_path / "resumed"), "--resume", str(tmp_path / "first"), *common]) == 0
    s = _summary(tmp_path / "resumed")
    assert s["steps"] == 12 and s["resumed_from_step"] == 6 and not s["qlora"]
    assert s["base_model_path"] == os.path.abspath(model) and s["data"] == str(text)
    from safetensors.torch import load_file

    straight = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    interrupted = load_file(str(tmp_path / "first" / "adapter" / "adapter_model.safetensors"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(interrupted[k], straight[k]) for k in straight)  # the last 6 steps did something
    assert main(["finetune", "--out", str(tmp_path / "other"), "--resume", str(tmp_path / "first"), "--qlora",
                 *common]) == 2
    assert "that run trained LoRA; drop --qlora to continue it" in capsys.readouterr().err


def test_local_model_jsonl_data_and_merge(tmp_path):
    model = _tiny_local_model(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"record {i}: the quick brown fox jumps over the lazy dog."})
                              for i in range(60)))
    out = str(tmp_path / "run")
    assert main(["finetune", "--model", model, "--data", str(data), "--targets", "q_proj,v_proj", "--steps", "6",
                 "--out", out, "--merge", "--rslora", "--alpha", "16", *SMALL]) == 0
    s = _summary(out)
    assert s["lora"]["target_modules"] == ["q_proj", "v_proj"] and s["lora"]["use_rslora"]
    cfg = json.load(open(os.path.join(out, "adapter", "adapter_config.json")))
    assert cfg["base_model_name_or_path"] == os.path.abspath(model)
    merged = transformers.AutoModelForCausalLM.from_pretrained(s["merge"]["path"]).eval()
    adapted = lora_ext.LoraModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(model),
                                                 os.path.join(out, "adapter"), quantize_base="nf4").eval()
    with torch.no_grad():
        a, b = merged(_ids(300)).logits, adapted(_ids(300)).logits
    # The merged model is the dequantized base plus the update: the adapter's model up to rounding.
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert s["merge"]["max_abs_logit_error"] < 1e-3
    assert not any(isinstance(m, (lora_ext.NF4Linear, lora_ext.LoraLinear)) for m in merged.modules())


def test_ctrl_c_saves_what_was_trained(tmp_path):
    model = _tiny_local_model(tmp_path / "model")
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "lora_ext", "finetune", "--model", model, "--steps", "100000",
                             "--out", str(out), *SMALL], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not out.exists() and time.time() < deadline:  # made just before training starts
        time.sleep(0.2)
    time.sleep(4)  # a few steps
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    s = _summary(out)
    assert s["interrupted"] and 0 < s["steps"] < 100000, output
    assert os.path.isfile(out / "adapter" / "adapter_model.safetensors")
    assert "interrupted at step" in output


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent/model"], "--model: no such directory: /nonexistent/model"),
    (["--data", "/nonexistent/data.txt"], "--data: no such file: /nonexistent/data.txt"),
    (["--resume", "/nonexistent/run"], "--resume: no such directory"),
])
def test_bad_paths_give_clear_errors(tmp_path, capsys, argv, message):
    assert main(["finetune", "--out", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written


def test_bad_data_and_arguments(tmp_path, capsys):
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    assert main(["finetune", "--data", str(csv), "--out", str(tmp_path / "o")]) == 2
    assert "--data must be a .txt or .jsonl file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    assert main(["finetune", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "line 2: expected an object with a string 'text' field" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert main(["finetune", "--data", str(short), "--out", str(tmp_path / "o")]) == 2
    assert "too few for --seq-len 128" in capsys.readouterr().err
    assert main(["finetune", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    for argv in (["--steps", "0"], ["--r", "-1"], ["--qlora", "yes"], ["--batch-size", "x"]):
        with pytest.raises(SystemExit) as e:
            main(["finetune", *argv])
        assert e.value.code == 2
    assert "must be a positive integer, got 0" in capsys.readouterr().err


def test_a_refused_run_leaves_the_run_in_out_as_it_was(tmp_path, capsys):
    """Arguments found bad only once the model is built (a learning rate, a target that matches nothing) are
    refused before anything is written: the run already in --out keeps its base model (another seed's)."""
    out = tmp_path / "run"
    assert main(["finetune", "--steps", "1", "--seed", "1", "--out", str(out), *SMALL]) == 0
    capsys.readouterr()

    def base_files():
        return {p.name: p.read_bytes() for p in (out / "base_model").iterdir()}

    before = base_files()
    for argv, message in ((["--lr", "-1"], "Invalid learning rate"),
                          (["--targets", "nothing_here"], "matches no Linear module"),
                          (["--device", "gpu"], "--device gpu: expected auto, cpu, cuda or cuda:N")):
        assert main(["finetune", "--steps", "1", "--out", str(out), *SMALL, *argv]) == 2
        assert message in capsys.readouterr().err
        assert base_files() == before, argv
    (tmp_path / "a_file").write_text("x")
    assert main(["finetune", "--steps", "1", "--out", str(tmp_path / "a_file"), *SMALL]) == 2
    assert "a file is there, not a directory" in capsys.readouterr().err


def test_no_command_runs_finetune_on_its_defaults(monkeypatch):
    from lora_ext.finetune import cli

    seen = []
    monkeypatch.setattr(cli, "run", lambda args: seen.append(args) or 0)
    assert main([]) == 0
    args = seen[0]
    assert (args.model, args.data, args.qlora, args.steps, args.targets, args.resume) == (None, None, None, 300,
                                                                                         "all-linear", None)
    from lora_ext.finetune.train import _qlora

    assert _qlora(args, {}) is True  # QLoRA unless told otherwise


def test_a_moved_default_run_resumes_on_its_saved_base(tmp_path):
    assert main(["finetune", "--steps", "2", "--out", str(tmp_path / "run"), *SMALL]) == 0
    os.rename(tmp_path / "run", tmp_path / "moved")  # the recorded base path no longer exists
    assert main(["finetune", "--steps", "3", "--resume", str(tmp_path / "moved"), "--out", str(tmp_path / "next"),
                 *SMALL]) == 0
    s = _summary(tmp_path / "next")
    assert s["steps"] == 3 and s["base_model_path"] == str(tmp_path / "moved" / "base_model") and s["qlora"]


def test_init_checkpointing_and_loraplus_flags(tmp_path, capsys):
    """--init pissa changes the base, so the run keeps that base (the PiSSA residual) as base_model/, on
    which the adapter gives the trained model; --gradient-checkpointing unsloth and --loraplus-ratio run;
    a resumed run keeps LoRA+'s optimizer groups and refuses another ratio."""
    model_dir = _tiny_local_model(tmp_path / "model")
    out = str(tmp_path / "run")
    flags = ["--model", model_dir, "--no-qlora", "--targets", "q_proj,v_proj", *SMALL]
    assert main(["finetune", "--steps", "4", "--out", out, "--init", "pissa", "--gradient-checkpointing", "unsloth",
                 "--loraplus-ratio", "8", *flags]) == 0
    s = _summary(out)
    assert (s["init"], s["gradient_checkpointing"], s["loraplus_ratio"]) == ("pissa", "unsloth", 8.0)
    original = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    residual = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "base_model"))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(residual.state_dict()[q], original.state_dict()[q], atol=1e-3)
    assert torch.equal(residual.state_dict()["model.layers.0.mlp.up_proj.weight"],
                       original.state_dict()["model.layers.0.mlp.up_proj.weight"])  # not a target: as it was
    saved = json.load(open(os.path.join(out, "adapter", "adapter_config.json")))
    # for that base as it is: PEFT (and lora_ext) would take a "pissa" init again on load
    assert saved["base_model_name_or_path"] == os.path.join(out, "base_model") and saved["init_lora_weights"] is True
    again = str(tmp_path / "again")
    assert main(["finetune", "--resume", out, "--steps", "6", "--out", again, *SMALL]) == 0
    assert _summary(again)["steps"] == 6 and _summary(again)["loraplus_ratio"] == 8.0
    assert main(["finetune", "--resume", out, "--steps", "6", "--out", again, "--loraplus-ratio", "4", *SMALL]) == 2
    assert "trained with --loraplus-ratio 8.0" in capsys.readouterr().err
    assert main(["finetune", "--steps", "2", "--out", str(tmp_path / "bad"), "--init", "loftq", *flags]) == 2
    assert "init_lora_weights='loftq' needs a 4-bit base" in capsys.readouterr().err
