"""`python -m lora_ext generate`: prompts naming their adapters, generated in mixed batches; each
completion equals greedy generation of that prompt alone with its adapter."""
import json

import pytest
import torch

from lora_ext.__main__ import main

from conftest import requires_c

pytestmark = requires_c
pytest.importorskip("transformers")


def test_generate_mixes_adapters_as_each_prompt_alone(tmp_path, capsys):
    from lora_ext import generate

    prompts = [("A Fox once saw", "aesop"), ("Alice was seen", "alice"), ("A Lion once ran", "__base__"),
               ("The Hare once s", "alice")]  # one length: no padding, so alone and batched see the same input
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "adapter": a}) + "\n" for p, a in prompts))
    out = tmp_path / "gen"
    argv = ["generate", "--out", str(out), "--train-steps", "3", "--max-new-tokens", "6", "--prompts", str(path)]
    assert main(argv) == 0
    assert "new tokens/s" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["adapter"]) for r in rows] == prompts
    adapters = {name: str(out / name / "adapter") for name in generate.DEMO}
    lora, tokenizer = generate._load(adapters, None, True, torch.device("cpu"))
    for row in rows:
        ids, mask = generate._batch(tokenizer, [row["prompt"]], torch.device("cpu"))
        with torch.no_grad():
            if row["adapter"] == "__base__":
                with lora.disable_adapter():
                    alone = lora.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                          pad_token_id=tokenizer.pad_token_id)
            else:
                lora.set_adapter(row["adapter"])
                alone = lora.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id)
        assert generate._decode(tokenizer, alone[0, ids.shape[1]:].tolist()) == row["completion"], row
    # the demo adapters are reused, and bad prompts are refused by name
    path.write_text(json.dumps({"prompt": "x", "adapter": "grimm"}) + "\n")
    assert main(argv) == 2
    assert "adapters that were not given: ['grimm']" in capsys.readouterr().err
    path.write_text("not json\n")
    assert main(argv) == 2
    assert "--prompts: line 1 must be a JSON object" in capsys.readouterr().err


def test_bad_arguments_are_refused_by_name(tmp_path, capsys):
    """Refused before any model loads: an adapter without its name, one whose directory is missing, counts
    that are not positive, a device that does not exist."""
    for argv, message in ((["--adapter", str(tmp_path)], "expected NAME=DIR"),
                          (["--adapter", f"a={tmp_path / 'missing'}"], "missing is not a directory"),
                          (["--device", "gpu"], "--device gpu: expected auto, cpu, cuda or cuda:N")):
        assert main(["generate", "--out", str(tmp_path / "out"), *argv]) == 2
        assert message in capsys.readouterr().err
    for argv in (["--batch-size", "0"], ["--max-new-tokens", "-3"]):
        with pytest.raises(SystemExit) as e:
            main(["generate", *argv])
        assert e.value.code == 2 and "must be a positive integer" in capsys.readouterr().err
