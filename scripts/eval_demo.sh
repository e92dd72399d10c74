#!/usr/bin/env bash
# The demo's eval tables (evals/results/demo/), against a running `moerge demo` (MOERGE_URL, admin key).
#   1. base and each expert on every task, n per task; the experts' results are recorded in the registry
#      (the `skills` router builds its profiles from them);
#   2. one composition per router (and per aggregator, k = 2), created here if missing;
#   3. oracle routing and every composition on the same mixed queries;
#   4. the held-out composite task (two skills in one message): k = 1 against k = 2, the latter with the
#      whole query sent to both experts and with each numbered part sent to its own expert (--decompose);
#   5. the six experts merged with each merge method (configs in evals/merges/, `moerge merge`), each merged
#      model beside the base and every expert on every task;
#   6. token-level routers (arrow, phatgoose, glider: the six adapters mixed per token in the torch engine)
#      on the mixed queries beside oracle routing, the query-level routers and every merged model, and on
#      the composite task beside the single experts; plus a heatmap of each one's routes on a sample query.
# Usage: scripts/eval_demo.sh [N]    (N queries per task, default 30: prefill-bound vLLM on 2 cores answers
#        about 2 queries/s, so 30 per task is ~25 minutes for all the rows)
#        STEPS="composite" runs only the named steps (of: experts routers composite merges token token-nested
#        token-vllm parity structured).
#   8. structured outputs: every answer asked for with a JSON Schema parses and validates (evals/structured.py),
#      for the base, each expert, a vote, a synthesis, token-level and weighted mixtures.
#   7. token-level routers over the two experts a nested composite needs (json_dates: find a JSON field, then
#      write it as an ISO date; json_units: find it, then convert it), top-2 and top-1, beside those experts;
#      plus `mixer`, whose router is trained for the composition on 64 examples of the task's train split.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-30}"
OUT=evals/results/demo
MOERGE=".venv/bin/moerge"
BASE=smollm2-135m-instruct
EXPERTS=(arithmetic-lora dates-lora json-extract-lora list-sort-lora sentiment-lora units-lora)
expert_flags=()
for e in "${EXPERTS[@]}"; do expert_flags+=(-e "$e"); done

create() {  # create NAME ARGS...: a composition, unless it exists
  local name="$1"; shift
  if ! "$MOERGE" composition show "$name" >/dev/null 2>&1; then
    "$MOERGE" composition create "$name" "$@" >/dev/null
    echo "created composition $name"
  fi
}

STEPS="${STEPS:-experts routers composite merges token token-nested token-vllm parity structured}"
step() { [[ " $STEPS " == *" $1 "* ]]; }

if step experts; then
  "$MOERGE" eval "$BASE" "${EXPERTS[@]}" --n "$N" --record --out "$OUT" \
    --title "Base and demo experts (eval split, n=$N per task, vLLM)" > /dev/null
  mv "$OUT/eval.md" "$OUT/experts.md"; mv "$OUT/eval.json" "$OUT/experts.json"; mv "$OUT/eval.png" "$OUT/experts.png"
fi

create two-step --router two_step "${expert_flags[@]}" --fallback "$BASE"
create skills --router skills "${expert_flags[@]}" --fallback "$BASE"
create instruct --router instruct -p "model=$BASE" "${expert_flags[@]}" --fallback "$BASE"
for task in arithmetic dates json_extract list_sort sentiment units; do
  examples=$(.venv/bin/python -c "
import json, sys
from evals.tasks import get_task
print(json.dumps([{'prompt': e.prompt, 'answer': e.answer} for e in get_task('$task').examples('train', 8)]))")
  create "kshot-${task//_/-}" --router kshot -p "examples=$examples" "${expert_flags[@]}" --fallback "$BASE"
done
create pair-vote --router embedding -p threshold=-1 "${expert_flags[@]}" --k 2 --aggregator vote
create pair-synthesize --router embedding -p threshold=-1 "${expert_flags[@]}" --k 2 --aggregator synthesize \
  --agg-param "model=$BASE"
create pair-select --router embedding -p threshold=-1 "${expert_flags[@]}" --k 2 --aggregator select \
  --agg-param "model=$BASE"
create pair-synthesize-parts --router embedding -p threshold=-1 "${expert_flags[@]}" --k 2 \
  --aggregator synthesize --agg-param "model=$BASE" --decompose

if step routers; then
"$MOERGE" eval oracle auto two-step skills instruct "kshot-{task}" pair-vote pair-synthesize pair-select \
  --n "$N" --out "$OUT" --title "Routing on mixed queries (eval split, n=$N per task, vLLM)" > /dev/null
mv "$OUT/eval.md" "$OUT/routers.md"; mv "$OUT/eval.json" "$OUT/routers.json"; mv "$OUT/eval.png" "$OUT/routers.png"
fi

if step composite; then
"$MOERGE" eval sentiment-lora arithmetic-lora auto pair-vote pair-synthesize pair-select pair-synthesize-parts \
  --task arithmetic_sentiment --split heldout --n "$N" --out "$OUT" \
  --title "Composite held-out task: two skills in one message (n=$N, vLLM)" > /dev/null
mv "$OUT/eval.md" "$OUT/composite.md"; mv "$OUT/eval.json" "$OUT/composite.json"; mv "$OUT/eval.png" "$OUT/composite.png"
fi
if step merges; then
  merged=()
  for config in evals/merges/*.yaml; do
    name=$(.venv/bin/python -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['name'])" "$config")
    if ! "$MOERGE" expert show "$name" >/dev/null 2>&1; then
      "$MOERGE" merge "$config" >/dev/null
      echo "merged $name"
    fi
    merged+=("$name")
  done
  "$MOERGE" eval "$BASE" "${EXPERTS[@]}" "${merged[@]}" --n "$N" --out "$OUT" \
    --title "Merged experts: each merge method against the base and every expert (eval split, n=$N per task, vLLM)" \
    > /dev/null
  mv "$OUT/eval.md" "$OUT/merges.md"; mv "$OUT/eval.json" "$OUT/merges.json"; mv "$OUT/eval.png" "$OUT/merges.png"
fi
if step token; then
  create arrow --router arrow -p top_k=2 "${expert_flags[@]}"
  # PHATGOOSE gates: 30 steps per expert instead of the paper's ~100 (3-4 s a step on a busy 2-core CPU; the
  # demo experts already fit their data with the gate half open, so the loss has little left to fall). One
  # torch thread: beside the running vLLM server two threads spin against each other and a step takes 10x.
  GATES='{"steps": 30}'
  OMP_NUM_THREADS=1 create phatgoose --router phatgoose -p top_k=2 -p "training=$GATES" "${expert_flags[@]}"
  create glider --router glider -p local=phatgoose -p "local_params={\"top_k\": 2, \"training\": $GATES}" \
    -p "model=$BASE" "${expert_flags[@]}"
  "$MOERGE" eval sentiment-lora arithmetic-lora arrow phatgoose glider pair-synthesize-parts \
    --task arithmetic_sentiment --split heldout --n "$N" --out "$OUT" \
    --title "Composite held-out task with token-level routers (n=$N)" > /dev/null
  mv "$OUT/eval.md" "$OUT/token-composite.md"; mv "$OUT/eval.json" "$OUT/token-composite.json"
  mv "$OUT/eval.png" "$OUT/token-composite.png"; rm -f "$OUT"/trace-*.png  # the traces come with the mixed queries
  merged=()
  for config in evals/merges/*.yaml; do
    merged+=("$(.venv/bin/python -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['name'])" "$config")")
  done
  "$MOERGE" eval oracle auto two-step skills instruct arrow phatgoose glider "${merged[@]}" --n "$N" --out "$OUT" \
    --title "Token-level routers on mixed queries, beside query-level routing and merging (eval split, n=$N per task)" \
    > /dev/null
  mv "$OUT/eval.md" "$OUT/token.md"; mv "$OUT/eval.json" "$OUT/token.json"; mv "$OUT/eval.png" "$OUT/token.png"
  for r in arrow phatgoose glider; do mv "$OUT/trace-$r.png" "$OUT/token-trace-$r.png"; done
fi
if step token-nested; then
  GATES='{"steps": 30}'
  rows=()
  for pair in dates:dates-lora units:units-lora; do
    skill=${pair%%:*}; expert=${pair##*:}; pair_flags=(-e json-extract-lora -e "$expert")
    for k in 2 1; do
      suffix=$([[ $k == 2 ]] && echo "" || echo "$k")
      create "arrow$suffix-json-$skill" --router arrow -p "top_k=$k" "${pair_flags[@]}"
      OMP_NUM_THREADS=1 create "phatgoose$suffix-json-$skill" --router phatgoose -p "top_k=$k" -p "training=$GATES" \
        "${pair_flags[@]}"
      create "glider$suffix-json-$skill" --router glider -p local=phatgoose \
        -p "local_params={\"top_k\": $k, \"training\": $GATES}" -p "model=$BASE" "${pair_flags[@]}"
    done
    # The router is trained when the composition is created (minutes on 2 cores) and stored for reuse.
    OMP_NUM_THREADS=1 create "mixer-json-$skill" --router mixer -p "task=json_$skill" "${pair_flags[@]}"
  done
  for skill in dates units; do
    expert="$skill-lora"
    "$MOERGE" eval json-extract-lora "$expert" {arrow,phatgoose,glider}{,1}-json-$skill "mixer-json-$skill" \
      --task "json_$skill" --split heldout --n "$N" --out "$OUT" \
      --title "Nested composite json_$skill: token-level routers over json-extract-lora + $expert (n=$N)" > /dev/null
    mv "$OUT/eval.md" "$OUT/token-json-$skill.md"; mv "$OUT/eval.json" "$OUT/token-json-$skill.json"
    mv "$OUT/eval.png" "$OUT/token-json-$skill.png"; rm -f "$OUT"/trace-*.png
  done
fi
if step token-vllm; then
  # The token-level rows again, now that a managed vLLM server runs such mixtures as one adapter slot (the `token`
  # tables above were measured on the torch engine), beside a `weighted` composition (the router's k = 2 adapters
  # applied together in one generation, weighted by a softmax of their scores).
  GATES='{"steps": 30}'
  create arrow --router arrow -p top_k=2 "${expert_flags[@]}"
  OMP_NUM_THREADS=1 create phatgoose --router phatgoose -p top_k=2 -p "training=$GATES" "${expert_flags[@]}"
  create glider --router glider -p local=phatgoose -p "local_params={\"top_k\": 2, \"training\": $GATES}" \
    -p "model=$BASE" "${expert_flags[@]}"
  create pair-weighted --router embedding -p threshold=-1 "${expert_flags[@]}" --k 2 --aggregator weighted \
    --agg-param temperature=0.05
  "$MOERGE" eval oracle arrow phatgoose glider pair-weighted --n "$N" --out "$OUT" \
    --title "Token-level routers and a weighted composition on mixed queries, served in vLLM (eval split, n=$N per task)" \
    > /dev/null
  mv "$OUT/eval.md" "$OUT/token-vllm.md"; mv "$OUT/eval.json" "$OUT/token-vllm.json"; mv "$OUT/eval.png" "$OUT/token-vllm.png"
  rm -f "$OUT"/trace-*.png
  "$MOERGE" eval sentiment-lora arithmetic-lora arrow phatgoose glider pair-weighted pair-synthesize-parts \
    --task arithmetic_sentiment --split heldout --n "$N" --out "$OUT" \
    --title "Composite held-out task, token-level routers and a weighted composition served in vLLM (n=$N)" > /dev/null
  mv "$OUT/eval.md" "$OUT/token-composite-vllm.md"; mv "$OUT/eval.json" "$OUT/token-composite-vllm.json"
  mv "$OUT/eval.png" "$OUT/token-composite-vllm.png"; rm -f "$OUT"/trace-*.png
fi
if step parity; then
  # vLLM's mixtures against the torch reference (evals/vllm_parity.py): the compositions above and a mixer over the
  # six, whose router trains when it is created (on 32 examples of the units task: parity, not quality).
  OMP_NUM_THREADS=1 create mixer-six --router mixer -p task=units -p task_examples=32 "${expert_flags[@]}"
  .venv/bin/python -m evals.vllm_parity arrow phatgoose glider mixer-six pair-weighted --out "$OUT"
fi
if step structured; then
  create arrow --router arrow -p top_k=2 "${expert_flags[@]}"
  create pair-weighted --router embedding -p threshold=-1 "${expert_flags[@]}" --k 2 --aggregator weighted \
    --agg-param temperature=0.05
  .venv/bin/python -m evals.structured "$BASE" "${EXPERTS[@]}" pair-vote pair-synthesize arrow pair-weighted \
    --out "$OUT"
fi
echo "wrote $OUT/{experts,routers,composite,merges,token,token-composite,token-json-*,token-vllm,vllm-parity,structured}.{md,json,png}"
