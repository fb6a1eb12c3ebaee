"""Table: per DeepSpeed engine setting, are the reduced gradients right when ranks draw different
mask ratios? Each setting runs alone (a crash or a collective mismatch is reported, not fatal) on 2
and 3 gloo ranks, against plain data parallel (tests/_mixed_parity_worker.py explains the setup).

    python -m benchmarks.mixed_rank_parity [--world 2,3] [--specs z0n1,z1n1,...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from dream_fast.dist import free_port

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "_mixed_parity_worker.py"
SPECS = ["z0n1", "z1n1", "z1o1", "z1om", "z2n1", "z2o1", "z2om", "z3o1", "z3om"]
NAMES = {"z": "ZeRO-", "o": "overlap", "n": "no overlap", "1": "1 bucket", "m": "many buckets"}


def describe(spec: str) -> str:
    return f"ZeRO-{spec[1]}, {NAMES[spec[2]]}, {NAMES[spec[3]]}"


def run(out: Path, specs: list[str], world: int) -> tuple[bool, str]:
    port = free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out), ",".join(specs)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        return False, "hang (killed after 300 s)"
    if any(p.returncode for p in procs):
        text = "\n".join(logs)
        why = "collective mismatch" if "mismatch" in text.lower() else "crashed"
        return False, why
    return True, ""


def wrong_params(out: Path, spec: str, world: int) -> tuple[int, int, float]:
    ref = load_file(str(out / f"mixed_ref_w{world}.safetensors"))
    got = load_file(str(out / f"mixed_{spec}_w{world}.safetensors"))
    floor = 1e-6 * max(float(v.abs().max()) for k, v in ref.items() if k.startswith("grad."))
    keys = [k for k in ref if k.startswith("grad.")]
    n_bad, worst = 0, 0.0
    for k in keys:
        err = float((got[k] - ref[k]).abs().max())
        scale = float(ref[k].abs().max())
        if err > 1e-5 * scale + floor:
            n_bad += 1
            worst = max(worst, err / max(scale, floor))
    return n_bad, len(keys), worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="2,3")
    ap.add_argument("--specs", default=",".join(SPECS))
    args = ap.parse_args()
    rows = ["| ranks | engine | reduced gradients |", "|---|---|---|"]
    for world in [int(w) for w in args.world.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            ok, why = run(out, ["ref"], world)
            assert ok, f"the plain data-parallel reference failed on {world} ranks: {why}"
            for spec in args.specs.split(","):
                ok, why = run(out, [spec], world)
                if ok:
                    n_bad, n, worst = wrong_params(out, spec, world)
                    res = "exact (fp32 noise)" if n_bad == 0 else f"{n_bad} of {n} wrong, error up to {worst:.2g}x"
                else:
                    res = why
                rows.append(f"| {world} | {describe(spec)} | {res} |")
                print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
