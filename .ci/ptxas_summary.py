"""Registers, spills and shared memory per CUDA kernel, from a build log made with -Xptxas=-v."""
import re
import shutil
import subprocess
import sys


def demangle(names):
    if not names or not shutil.which("c++filt"):
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def short(name: str) -> str:
    name = re.sub(r"\(anonymous namespace\)::|lora_ext::|\[clone[^\]]*\]", "", name)
    name = re.sub(r"\(.*\)$", "", name)
    return name.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")


def main(path: str) -> int:
    rows, current = [], None
    for line in open(path, errors="replace"):
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            current = {"name": m.group(1), "arch": m.group(2)}
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current is not None:
            current.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current is not None:
            smem = re.search(r"(\d+) bytes smem", line)
            current.update(regs=int(m.group(1)), smem=int(smem.group(1)) if smem else 0)
            rows.append(current)
            current = None
    if not rows:
        print(f"ptxas summary: no kernel entries in {path} (CPU-only build, or the build was incremental)")
        return 0
    names = demangle([r["name"] for r in rows])
    width = max(len(short(n)) for n in names)
    print(f"{'kernel'.ljust(width)}  arch    regs  stack  spill st/ld  smem")
    for r, n in zip(rows, names):
        print(f"{short(n).ljust(width)}  {r['arch']:<6}  {r['regs']:>4}  {r.get('stack', 0):>5}  "
              f"{r.get('spill_st', 0):>5}/{r.get('spill_ld', 0):<5}  {r['smem']:>4}")
    spills = [short(n) for r, n in zip(rows, names) if r.get("spill_st", 0) or r.get("spill_ld", 0)]
    print(f"{len(rows)} kernels; {'spills in: ' + ', '.join(spills) if spills else 'no spills'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "build/build.log"))
