#!/usr/bin/env bash
# The GRPO study on ML-100K (issue 14), one stage at a time: each stage is hours of CPU,
# resumes when run again, and should run alone on the cores.
#
#   bash benchmarks/grpo_study.sh STAGE
#
# Stages, in order:
#   teach       the teacher on 100 train tasks, shuffled presentation (trajectories,
#               committed with their summary)
#   sft         the SFT student on the runs with the target in the first 5
#   spread      the reward spread of the SFT student's sampled groups per temperature
#               (with exploration of orders: spread --temperatures 0.7 --set grpo.explore_ranking=1.0
#               --out benchmarks/results/ml-100k/grpo-study/grpo_spread_explore.json)
#   lists       how far the list leaves the shown order per list temperature (the value
#               of grpo.explore_ranking), sampled at the list opening of one pass a prompt
#   grpo        GRPO from the SFT student (the CPU preset)
#   eval-sft    the SFT student on eval-200 (the teacher's tasks)
#   eval-grpo   the GRPO student on eval-200
#   ablate-sft  the SFT students without reflection and without tool calls (same runs);
#               `ablate-sft no-tools` trains one of them
#   eval-ablate the ablations on eval-200: those two students, and the finished student
#               (EVIDENCE_MODEL: grpo by default, or sft) with its tool calls answered by a
#               fixed line (no CST evidence); `eval-ablate no-tools` runs one of them
#   table       the paired table of the teacher and the students on eval-200
#
# Environment: R, where runs go (default runs/grpo-study); STAR, the star command
# (default star); PY, the Python (default python). Run from the repository root.
set -euo pipefail
R=${R:-runs/grpo-study}
STAR=${STAR:-star}
PY=${PY:-python}
RESULTS=benchmarks/results/ml-100k/grpo-study
mkdir -p "$R" "$RESULTS"
stage=${1:-}
# every name is checked before the first (hours-long) run starts
known_ablations() {
  local stage=$1 known=$2 name
  for name in "${@:3}"; do
    case " $known " in *" $name "*) ;;
      *) echo "$stage: unknown ablation '$name' (${known// /, })" >&2; exit 2 ;;
    esac
  done
}
case $stage in
  teach)
    $STAR teach --users all --split train --limit 100 --out "$R/teacher-train.jsonl"
    # the trajectories are the record of this stage (the per-task file of its summary:
    # shown order kept, hits at 1, 3 and 5, tool calls, seconds)
    $STAR view "$R/teacher-train.jsonl" --summary --json > "$RESULTS/teacher-train.json"
    cp "$R/teacher-train.jsonl" "$RESULTS/teacher-train.tasks.jsonl" ;;
  # a teacher at chance keeps about 5 of 100 runs at top 1; the first 5 teach the format
  # and the tool use, not the ranking (that is GRPO's to learn)
  sft) $STAR distill sft --trajectories "$R/teacher-train.jsonl" --top-k 5 --out "$R/sft" --resume ;;
  spread) $PY benchmarks/grpo_spread.py --model "$R/sft" --temperatures 0.7,1.0 --prompts 10 \
            --group 4 --out "$RESULTS/grpo_spread.json" "${@:2}" ;;
  lists) $PY benchmarks/grpo_list_temperature.py --model "$R/sft" --temperatures 1,2,3,5 \
           --out "$RESULTS/grpo_list_temperature.json" "${@:2}" ;;
  grpo) $STAR distill grpo --model "$R/sft" --out "$R/grpo" --preset cpu --resume "${@:2}" ;;
  eval-sft|eval-grpo)
    name=${stage#eval-}
    $STAR eval --system star --model "$R/$name" --users eval-200 \
      --records "$R/star-$name-records.jsonl" --out "$RESULTS/ml-100k-star-$name-test-eval-200.json" ;;
  ablate-sft)
    known=(no-reflection no-tools) ablations=("${@:2}")
    [ ${#ablations[@]} -gt 0 ] || ablations=("${known[@]}")
    known_ablations ablate-sft "${known[*]}" "${ablations[@]}"
    for ablation in "${ablations[@]}"; do
      $STAR distill sft --trajectories "$R/teacher-train.jsonl" --top-k 5 --out "$R/sft-$ablation" \
        --"$ablation" --resume
    done ;;
  eval-ablate)
    known=(no-reflection no-tools no-evidence) ablations=("${@:2}")
    [ ${#ablations[@]} -gt 0 ] || ablations=("${known[@]}")
    known_ablations eval-ablate "${known[*]}" "${ablations[@]}"
    for ablation in "${ablations[@]}"; do
      case $ablation in
        no-reflection|no-tools)
          $STAR eval --system star --model "$R/sft-$ablation" --users eval-200 \
            --records "$R/star-sft-$ablation-records.jsonl" \
            --out "$RESULTS/ml-100k-star-sft-$ablation-test-eval-200.json" ;;
        no-evidence)
          # on the finished student: grpo, or sft where GRPO did not beat it (EVIDENCE_MODEL)
          m=${EVIDENCE_MODEL:-grpo}
          $STAR eval --system star --model "$R/$m" --users eval-200 --set student.evidence=false \
            --records "$R/star-$m-no-evidence-records.jsonl" \
            --out "$RESULTS/ml-100k-star-$m-no-evidence-test-eval-200.json" ;;
      esac
    done ;;
  table)
    teacher=benchmarks/results/ml-100k/ml-100k-mars-test-eval-200.json
    $STAR report "$teacher" "$RESULTS"/ml-100k-star-*-test-eval-200.json --out "$RESULTS/table.md"
    for student in "$RESULTS"/ml-100k-star-*-test-eval-200.json; do
      $STAR report --paired "$student" "$teacher"
    done
    if [ -f "$RESULTS/ml-100k-star-grpo-test-eval-200.json" ]; then
      $STAR report --paired "$RESULTS/ml-100k-star-grpo-test-eval-200.json" \
        "$RESULTS/ml-100k-star-sft-test-eval-200.json"
    fi ;;
  *) echo "usage: bash benchmarks/grpo_study.sh teach|sft|spread|lists|grpo|eval-sft|eval-grpo|ablate-sft|eval-ablate|table" >&2
     exit 2 ;;
esac
