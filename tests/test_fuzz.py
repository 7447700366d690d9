"""The fuzz of every operator and public function against lora_ext.reference (the cases, the rule and the oracles
are in tests/fuzz_cases.py).

The fuzz runs in child processes: a crash (segfault, abort) or a hang fails the target it happened in, with the
last case the child printed, and the other targets run on in a new child. In CI: derandomized, about a minute.
Longer and randomized, the time shared by the targets: LORA_EXT_FUZZ_SECONDS=600 python -m pytest tests/test_fuzz.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fuzz_cases
from conftest import requires_c

pytestmark = requires_c

SECONDS = float(os.environ.get("LORA_EXT_FUZZ_SECONDS", "0"))
ROOT = Path(__file__).resolve().parent.parent
HANG_S = 600  # beyond its time, a child is taken for hung


def run_fuzz(names: list, workdir: Path, seconds: float = 0.0) -> dict:
    """{target: result} for `names`, run in order in a child process. When the child dies, the first target
    without a result is the one it died in: recorded as a crash with its last printed case, and the targets
    after it run in a new child."""
    paths = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    results, todo = {}, list(names)
    out, log = workdir / "results.json", workdir / "log.txt"
    while todo:
        out.unlink(missing_ok=True)
        share = seconds * len(todo) / len(names)
        cmd = [sys.executable, fuzz_cases.__file__, "--results", str(out), "--seconds", str(share), *todo]
        with open(log, "w") as f:
            try:
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=share + HANG_S).returncode
                ended = f"exit status {rc}"
            except subprocess.TimeoutExpired:
                ended = f"no end after {share + HANG_S:.0f} s: hung"
        results.update(json.loads(out.read_text()) if out.exists() else {})
        todo = [n for n in todo if n not in results]
        if todo:
            lines = log.read_text().splitlines()
            case = next((ln for ln in reversed(lines) if ln.startswith("CASE ")), "(no case printed)")
            tail = "\n".join(lines[-20:])
            results[todo.pop(0)] = dict(status="crash", examples=None,
                                        detail=f"the child process died ({ended}) in\n{case}\nits last output:\n{tail}")
    return results


def _selected_targets(session) -> list:
    """The targets of the test_fuzz items this session runs (all of them, unless -k picked some)."""
    picked = {item.callspec.params["target"] for item in session.items
              if item.originalname == "test_fuzz" and hasattr(item, "callspec")}
    return [n for n in fuzz_cases.TARGET_NAMES if n in picked]


@pytest.fixture(scope="module")
def fuzz_results(request, tmp_path_factory):
    return run_fuzz(_selected_targets(request.session), tmp_path_factory.mktemp("fuzz"), SECONDS)


@pytest.mark.parametrize("target", fuzz_cases.TARGET_NAMES)
def test_fuzz(fuzz_results, target):
    result = fuzz_results[target]
    print(f"{target}: {result['examples']} cases in {result.get('seconds')} s")  # (pytest -rA shows it)
    assert result["status"] == "ok", f"{target}: {result['status']}\n{result['detail']}"
    assert result["examples"] > 0


@pytest.mark.parametrize("defect", list(fuzz_cases.KNOWN_DEFECTS))
def test_defects_the_fuzz_found_stay_fixed(defect):
    """Each case once gave torch's own message instead of ours (fixed in lora.py): it must now keep the rule."""
    case = fuzz_cases.KNOWN_DEFECTS[defect]
    fuzz_cases.TARGETS[case.target].run(case)


def test_a_crash_fails_its_target_with_its_case_and_the_rest_runs_on(tmp_path):
    results = run_fuzz(["selfcheck_crash", "lora_dropout"], tmp_path)
    crash = results["selfcheck_crash"]
    assert crash["status"] == "crash" and "CASE Case.of('selfcheck_crash'" in crash["detail"], crash
    assert results["lora_dropout"]["status"] == "ok", results["lora_dropout"]
