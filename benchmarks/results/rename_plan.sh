#!/usr/bin/env bash
# Results hygiene (issue 19, item 3): one folder per run, named <date>_<what>_<hardware>/, each with a
# run.md (command, git sha, config, machine, load) and, for benchmark rows, one CSV named rows.csv.
# Superseded runs are deleted (git keeps them: read one with `git show 580c79b:benchmarks/results/PATH`).
#
# NOT RUN YET. Run it once, from the repository root, after the other branches have landed:
#     bash benchmarks/results/rename_plan.sh            # moves + run.md stubs + link rewrites
#     DELETE_SUPERSEDED=1 bash benchmarks/results/rename_plan.sh   # ... and git rm the superseded runs
# then check `git status`, run `git grep -n "benchmarks/results/"` for stragglers, and commit.
# Hardware labels: epyc-2c-avx512bf16 = AMD EPYC, 2 cores, avx2 + avx512f + avx512_bf16 (inferred for
# runs of 2026-11-29/30: their CSVs record only cpu:x86_64x2; bf16 autocast measured 1.5x fp32 there).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
R=benchmarks/results
HW=epyc-2c-avx512bf16

stub() {  # stub DIR COMMAND CODE_SHA ADDED_IN CONFIG LOAD NOTE
  cat > "$1/run.md" <<EOF
# $(basename "$1")

- command: \`$2\`
- code: git $3 (results added in $4)
- config: $5
- machine: AMD EPYC, 2 cores, avx2 avx512f avx512_bf16 (flags inferred, see ../README.md), 2 threads, torch 2.13.0+cpu, triton 3.9.0
- load: $6
- notes: $7
EOF
  git add "$1/run.md"
}

# ---- current runs: move into their folders -------------------------------------------------------
D=$R/2026-11-29_cpu-bench_$HW
mkdir -p "$D" && git mv $R/cpu_2026-11-29.csv "$D/rows.csv"
stub "$D" "python -m benchmarks.run_cpu" 2aa140c 8176e6d \
  "presets tiny (then with diffusion_batch_mul 4) and bench_ref_tiny, fp32, batch 64, r = 0.75; sampler 16 steps, cfg 3, K = 1 and K = 5 T = 8" \
  "not recorded (author: idle)" "kernels (reference eager vs compiled), train step, sampler"

D=$R/2026-11-29_train-step_$HW
mkdir -p "$D" && git mv $R/train_step_2026-11-29.csv "$D/rows.csv"
stub "$D" "python -m benchmarks.benchmark_train_step --precision fp32 --csv rows.csv; the same with --precision bf16" \
  c241358 dc0c205 "presets tiny and bench_ref_tiny, batch 64, r = 0.75, fp32 and bf16 autocast" \
  "not recorded" "re-measures the 2aa140c train-step rows on the same machine kind"

D=$R/2026-11-29_sanity-memorise_$HW
mkdir -p "$D" && git mv $R/demo_2026-11-29/sanity_memorise_4_images.png "$D/"
stub "$D" "python -m benchmarks.sanity_memorise" "unknown (before e4de33c)" e4de33c \
  "tiny preset of that morning, 4 captioned images, 600 steps, first shapes data (6.4/10.2 px)" \
  "not recorded" "colour 100%, position 100%, shape 50%"

D=$R/2026-11-30_demo-v4_$HW
git mv $R/demo_v4_2026-11-30 "$D"
stub "$D" "make demo   (= dream-fast demo --minutes 10 --prompts 200)" "parent of 27b71f9 + its change" 27b71f9 \
  "tiny preset as of 27b71f9 (10.2/13.4-px shapes, detail weight 5, bf16 via precision auto); plan.json holds the sized schedule" \
  "not recorded" "the committed reference demo: 1573 steps, 13.9 min in all"

D=$R/2026-11-30_repro-shapes_$HW
mkdir -p "$D" && git mv $R/repro_shapes.md "$D/report.md" && git mv $R/repro_shapes.json "$D/report.json"
stub "$D" "python -m benchmarks.repro_shapes --minutes 10" "parent of 97c8483 + its change" 97c8483 \
  "tiny preset, 10 min per variant (dream, fluid, contrastive_only), 500 seen-combination prompts" \
  "1-min load 1.15 at start, 2.05 at end (report.json)" "DREAM vs FLUID vs contrastive-only; SAD T = 8 and T = 4"

# the first-data demo history is a notebook entry now (docs/notebook/2026-11-29-first-data.md)
git rm -q $R/demo_2026-11-29/history.md

# ---- superseded runs ---------------------------------------------------------------------------
SUPERSEDED=(
  $R/demo_2026-11-29           # first data, 11-29 evening preset (+ bf16_plain/, fp32_preset/, previous_preset/)
  $R/demo20_2026-11-29         # 20-minute demos of 11-29 (+ preset_now/, preset_now_bf16/), first data
  $R/demo_v2_2026-11-29        # 8.3/10.9-px shapes, plain-mean loss
  $R/demo_v3_2026-11-30        # + detail-weighted loss; superseded by demo v4 (10.2/13.4-px shapes)
  $R/repro_shapes_2026-11-29.md $R/repro_shapes_2026-11-29.json      # 8.3/10.9-px data
  $R/repro_shapes_first_data.md $R/repro_shapes_first_data.json      # first data, older preset, fp32
)
if [[ "${DELETE_SUPERSEDED:-0}" == 1 ]]; then
  git rm -r -q "${SUPERSEDED[@]}"
fi

# ---- links in documents -----------------------------------------------------------------------
# Only the current runs' paths are rewritten; the notebook keeps old paths on purpose (read them with
# `git show 580c79b:PATH`).
FILES=(README.md docs/results.md docs/README.draft.md docs/sampling.md docs/training.md docs/eval.md)
for f in "${FILES[@]}"; do
  [[ -f "$f" ]] || continue
  sed -i \
    -e "s#results/cpu_2026-11-29\.csv#results/2026-11-29_cpu-bench_$HW/rows.csv#g" \
    -e "s#results/train_step_2026-11-29\.csv#results/2026-11-29_train-step_$HW/rows.csv#g" \
    -e "s#results/demo_2026-11-29/sanity_memorise_4_images\.png#results/2026-11-29_sanity-memorise_$HW/sanity_memorise_4_images.png#g" \
    -e "s#results/demo_v4_2026-11-30#results/2026-11-30_demo-v4_$HW#g" \
    -e "s#results/repro_shapes\.md#results/2026-11-30_repro-shapes_$HW/report.md#g" \
    -e "s#results/repro_shapes\.json#results/2026-11-30_repro-shapes_$HW/report.json#g" \
    "$f"
  git add "$f"
done
# link texts in the two result pages name the files too
for f in docs/results.md docs/README.draft.md; do
  [[ -f "$f" ]] || continue
  sed -i \
    -e "s#\[cpu_2026-11-29\.csv\]#[2026-11-29_cpu-bench_$HW/rows.csv]#g" \
    -e "s#\[train_step_2026-11-29\.csv\]#[2026-11-29_train-step_$HW/rows.csv]#g" \
    -e "s#\[demo_v4_2026-11-30#[2026-11-30_demo-v4_$HW#g" \
    -e "s#\[repro_shapes\.md\]#[2026-11-30_repro-shapes_$HW]#g" \
    "$f"
  git add "$f"
done
echo "done; now: git status && git grep -n 'benchmarks/results/' -- ':!docs/notebook'; then drop the 'today' column of benchmarks/results/README.md"
