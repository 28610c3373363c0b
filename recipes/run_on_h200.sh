#!/usr/bin/env bash
# One device call's worth of GPU work on an H200, logs and tables under $OUT; the tables are printed last.
#   bash recipes/run_on_h200.sh STEP [STEP ...]      one step per device call: each is sized for a 10-minute command
# Steps (expected minutes on one H200, machine start and transfers excluded; since session 13 every benchmark variant
# compiles into empty caches of its own, compile_cache=per_variant: 10-30 s more start-up per compiled variant, and
# BENCH_ARGS=compile_cache=shared reuses the machine's):
#   tests (~10) the GPU tests (-m "gpu and not slow") and the Triton kernel tests, natively on CUDA (GPU_TESTS_SHARD)
#   soak (~6)   the 5-minute GPU soak (SOAK_SECONDS)
#   w1 (~7) w2 (~7) w3 (~4)   the published workloads, plus ours_async_no_prefix_cache (issue 11: within 2%)
#   w2s (~4)    W2 sampled; ours_async sampled beside ours_async_greedy (issue 9: ratio >= 0.90)
#   w4 (~7)     prefill-heavy, % of the matrix rate, first call vs repeated call (issue 14)
#   w5 (~6)     shared prefixes, prefix caching on vs off (issue 11: >= 4x)
#   w6 (~8)     Qwen3-30B-A3B-shaped MoE, ours against static and hf_cb (issue 13)
#   w7 (~5)     nano-vllm's bench.py setting (issue 14: >= 25,000 out tok/s), first call vs repeated call
#   w8 (~5)     turnover: 1,024 requests of 16..512 new tokens through 512 slots; admission in batches vs one at a time
#   s1 (~4)     scoring 4,000 pairs through ContinuousBatcher.score (issue 9)
#   sampling (~1)  recipes/bench/sampling_speed.py: sample() alone, new against the previous implementation
#   eval (~6)   recipes/bench/eval_bench.py, both backends (carry .whl built with 'fetch_wheels.sh eval' and
#               .bench_tokenizer from 'eval_bench.py --save-tokenizer .bench_tokenizer')
#   atune (~4) the Triton attention kernel's tests natively, then recipes/bench/attention_tuning.py's launch sweep
#   gtune (~5)  recipes/bench/gemm_tuning.py: the decode products, cuBLAS vs triton_matmul's split-K launches (GTUNE_S, GTUNE_ARGS)
#   gemm (~2)   recipes/bench/gemm_shapes.py: the decode steps' matrix products in CUDA graphs vs the copy/matmul bounds;
#               recipes/bench/graph_launch.py: host cost of a graph replay by node count, and of W1's decode graph
#   probe (~3)  recipes/bench/step_probe.py on PROBE_WORKLOADS (w1 w7): a full and a small prefill step (compiled and
#               not) and decode graph replays, GPU ms by kernel, kernels and the gaps between them (PROBE_ARGS: more
#               arguments, e.g. --decode-sizes 8,32,128,256 --no-prefill --variant ours_async_decode_2warps; PROBE_S: each
#               workload's limit, 200 s)
#   host (~1)   recipes/bench/host_step.py: the engine's host work per step by phase, model and sampler stubbed (W1's requests)
#   attention, ddp   as in recipes/run_on_h100.sh (ddp needs the nvidia-h200-x2 kind)
#   tp (~9)     nvidia-h200-x2 kind: the tensor-parallel GPU tests; all-reduce latency (recipes/bench/allreduce_latency.py);
#               W3 on one GPU vs TP=2 (issue 15: decode >= 1.6x) and its levers; W3's requests on a Llama-3.1-70B-shaped
#               random bf16 model, TP=2 (recipes/bench/tp_bench.py). TP_RUNS picks the runs (tp1 tp2 tp2_nccl
#               tp2_unfused tp2_plain 70b), TP_RUN_S the limit of each (240 s)
# Device call: run(command="bash recipes/run_on_h200.sh w4", carry=[".whl"], timeout_s=600)
# Wheels: the machine has torch, transformers, lightning but not hydra-core, omegaconf, antlr4-python3-runtime, nor
# lm_eval and some of its dependencies (datasets, evaluate, dill, multiprocess, more-itertools, pytablewriter and its
# five helpers, chardet, pytz, rouge-score, nltk, defusedxml, sqlitedict, word2number). `bash recipes/fetch_wheels.sh`
# (add `eval` for lm_eval's) downloads them into .whl/ once, on a machine with a registry; this script installs them
# once per machine into /tmp/site.
# Knobs: GPU_TESTS_K (tests: a pytest -k filter), GPU_TESTS_S (tests: time limit, 560 s), GPU_TESTS_SHARD=i/n (tests: every
# n-th test from the i-th; GPU_TESTS_RESUME=k then drops its first k, to finish a shard a limit cut; two shards at once on one card
# race for memory, since some tests size their KV cache from free memory: session 18 lost one test to it; the whole GPU suite takes more than one call since session 10: run 1/2 and 2/2), GPU_TESTS_WORKERS=2 (tests:
# one pytest-xdist worker per GPU of the nvidia-h200-x2 kind; the TP tests then skip: step tp runs them), TRITON_TESTS=0 (tests: skip
# the native run of the kernel tests), BENCH_ARGS (extra Hydra overrides for every benchmark step), FIRST_CALL=1 (first vs repeated call in every
# step, not just w4 and w7), STEP_S (hard limit of one benchmark step, 560 s), EVAL_ARGS (more eval_bench.py arguments),
# EVAL_S (the eval step's limit, 500 s), ATUNE_S (the atune sweep's limit), TUNING_SHAPES (atune: substrings of the shapes to sweep), TUNING_GRID_ONLY=1 (atune: only the grid orders against the default), TUNING_CACHE_LAYOUTS=16,64,head16,head64 (atune: the default decode launch on other cache block sizes and head-major blocks), TUNING_ONE_LOOP_ONLY=1 (atune: every key tile through one loop, decode), TUNING_HEAVY_FIRST_ONLY=1 (atune: query blocks last first, prefill), TUNING_WARPS2_ONLY=1 (atune: 2- and 1-warp decode programs against the 4-warp launch), TUNING_HEADS_ONLY=1 (atune: decode programs over 2, 4 or all kv heads of a sequence against one_loop and the default), TUNING_WARPS1_ONLY=1 / TUNING_LOOPS_ONLY=1 (atune: 1-warp decode programs, split or not / through one loop or in sequence order), TUNING_PAIRS_ONLY=1 / TUNING_PAIRS2_ONLY=1 (atune: decode programs over pairs of sequences, attention.DECODE_PAIRS, and their launch configurations), TUNING_ENGINE_BASE=1 (atune: decode rows from the engine's launch: head-major blocks, longest first, DECODE_MAXNREG, DECODE_WARPS and its cap, the fused K/V write),
# W12_VARIANTS / W2S_VARIANTS / W3_VARIANTS / W4_VARIANTS / W6_VARIANTS / W7_VARIANTS / W8_VARIANTS (a step's variant list), TP_TESTS=0 (tp: benchmarks only),
# TP_RUNS, TP_RUN_S, TP_ALLREDUCE=0 (tp: no all-reduce probe), TP_BATCHER (tp: BatcherConfig overrides as JSON),
# TP_PROFILE (tp: profile this many new tokens after each timed run), TP_TESTS_K / TP_TESTS_S (tp: -k filter, limit).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then  # once per machine (the same wheel set): parallel steps share it
  stamp=$(ls .whl/*.whl | sort | md5sum | cut -c1-12)
  if [ ! -f "/tmp/site/.wheels-$stamp" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && touch "/tmp/site/.wheels-$stamp"
  fi
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import hydra, omegaconf" 2>/dev/null || echo "hydra-core/omegaconf missing: run recipes/fetch_wheels.sh here and carry .whl" >&2

SUMMARIES=()
first_call() { [ "${FIRST_CALL:-0}" = 1 ] || [ "$1" = on ] && echo first_call.enabled=true; }

bench() {  # bench WORKLOAD VARIANTS [first_call_default] [hydra overrides...]: one benchmark run, its logs tarred
  local what=$1 variants=$2 fc=${3:-off}; shift 3 || shift $#
  timeout -k 15 "${STEP_S:-560}" python3 recipes/benchmark.py workload="$what" "variants=[$variants]" out_dir="$OUT/$what" \
    budget_s=$(( ${STEP_S:-560} - 40 )) $(first_call "$fc") "$@" ${BENCH_ARGS:-} > "$OUT/$what.log" 2>&1 \
    || echo "[$what] benchmark.py exited with status $? (see $what.log)"
  grep "^\[$what\]" "$OUT/$what.log"
  rm -rf "$OUT/$what/jobs" "$OUT/$what/timelines"
  [ -d "$OUT/$what/logs" ] && tar czf "$OUT/$what/logs.tgz" -C "$OUT/$what" logs && rm -rf "$OUT/$what/logs"
  SUMMARIES+=("$OUT/$what/bench_$what.md")
}

pack() {  # the device returns at most 8 files: past that, one archive per step folder (with its log) instead
  [ "$(find "$OUT" -type f | wc -l)" -le 8 ] && return
  for d in "$OUT"/*/; do
    local s; s=$(basename "$d")
    tar czf "$OUT/$s.tgz" -C "$OUT" "$s" $([ -f "$OUT/$s.log" ] && echo "$s.log") && rm -rf "$d" "$OUT/$s.log"
  done
}

for what in "$@"; do
  case "$what" in
    tests) # -m "gpu and not slow": the soak is its own step; the unmarked kernel tests run natively when CUDA is there
      workers=${GPU_TESTS_WORKERS:-1}  # > 1: one pytest-xdist worker per GPU (AB_TEST_GPUS, tests/conftest.py)
      [ "$workers" -gt 1 ] && xdist=(-n "$workers" --dist load) || xdist=()
      # failures printed as they happen and a stack dump of a test past 240 s: a limit may cut the summary off
      AB_INSTAFAIL=1 AB_TEST_SHARD=${GPU_TESTS_SHARD:-} AB_TEST_RESUME=${GPU_TESTS_RESUME:-} AB_TEST_GPUS=$([ "$workers" -gt 1 ] && echo "$workers") \
        timeout -k 15 "${GPU_TESTS_S:-560}" python3 -m pytest -q -o faulthandler_timeout=240 --durations=30 \
        -p no:cacheprovider --continue-on-collection-errors "${xdist[@]}" -m "gpu and not slow" \
        ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} tests/ > "$OUT/gpu_tests.log" 2>&1; tail -15 "$OUT/gpu_tests.log"
      SUMMARIES+=("$OUT/gpu_tests.log")
      if [ "${TRITON_TESTS:-1}" = 1 ]; then
        timeout -k 15 300 python3 -m pytest -q -p no:cacheprovider -m "not gpu" tests/test_triton_attention.py \
          > "$OUT/triton_tests.log" 2>&1; tail -5 "$OUT/triton_tests.log"
        SUMMARIES+=("$OUT/triton_tests.log")
      fi ;;
    soak) SOAK_SECONDS=${SOAK_SECONDS:-300} timeout -k 15 560 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu_soak.py \
            > "$OUT/gpu_soak.log" 2>&1; tail -5 "$OUT/gpu_soak.log" ;;
    w1|w2) bench "$what" ${W12_VARIANTS:-static,hf_cb,ours_sync,ours_async,ours_async_eager,ours_async_no_prefix_cache,ours_async_lightning} ;;
    w3)  bench w3 ${W3_VARIANTS:-ours_sync,ours_async} ;;
    w2s) bench w2s ${W2S_VARIANTS:-ours_async,ours_async_greedy,ours_sync,static} ;;
    w4)  bench w4 ${W4_VARIANTS:-ours_async,ours_sync,static,hf_cb} on ;;
    w5)  bench w5 ours_async,ours_async_no_prefix_cache,static,hf_cb ;;
    w6)  bench w6 ${W6_VARIANTS:-ours_async,static,hf_cb,ours_sync} off timeout_s=240 ;;  # each variant builds the 61 GB model anew
    w7)  bench w7 ${W7_VARIANTS:-ours_async,ours_sync,ours_async_greedy,static} on ;;
    w8)  bench w8 ${W8_VARIANTS:-ours_async_admit_each,ours_async_admit_auto,ours_async_admit_16,ours_async_admit_128} ;;
    s1)  bench s1 ours_async,ours_sync,static ;;
    sampling)
      PYTHONPATH=plugin${PYTHONPATH:+:$PYTHONPATH} timeout -k 15 240 python3 recipes/bench/sampling_speed.py \
        --out "$OUT/sampling_speed.json" > "$OUT/sampling_speed.log" 2>&1 || echo "sampling: exited with status $?"
      SUMMARIES+=("$OUT/sampling_speed.log") ;;
    eval)
      if [ ! -f recipes/bench/eval_bench.py ]; then
        echo "eval: recipes/bench/eval_bench.py is not in this checkout; skipped"
      elif ! python3 -c "import lm_eval" 2>/dev/null; then
        echo "eval: lm_eval does not import; run 'bash recipes/fetch_wheels.sh eval' and carry .whl; skipped"
      else
        python3 -m pip show pyarrow fsspec huggingface-hub 2>/dev/null | grep -E "^(Name|Version)" > "$OUT/eval.log"
        # The work folder holds the saved 2.5 GB model: it stays in /tmp, and only the report comes back.
        timeout -k 15 "${EVAL_S:-500}" python3 recipes/bench/eval_bench.py --out /tmp/eval_bench --tokenizer .bench_tokenizer \
          ${EVAL_ARGS:-} >> "$OUT/eval.log" 2>&1 || echo "eval: exited with status $?"
        mkdir -p "$OUT/eval" && cp /tmp/eval_bench/eval_bench.* "$OUT/eval/" 2>/dev/null
        SUMMARIES+=("$OUT/eval.log")
      fi ;;
    atune) # the Triton kernels' tests, natively (bf16 and GPU-only cases included; TRITON_TESTS=0 skips them), then
      # the attention launch sweep
      if [ "${TRITON_TESTS:-1}" = 1 ]; then
        timeout -k 15 240 python3 -m pytest -q -p no:cacheprovider tests/test_triton_attention.py tests/test_triton_sampling.py \
          > "$OUT/triton_tests.log" 2>&1; tail -3 "$OUT/triton_tests.log"
      fi
      timeout -k 15 "${ATUNE_S:-300}" python3 recipes/bench/attention_tuning.py > "$OUT/attention_tuning.md" \
        2> "$OUT/attention_tuning.err" || echo "atune: exited with status $?"
      SUMMARIES+=("$OUT/triton_tests.log" "$OUT/attention_tuning.md") ;;
    gtune) # the decode steps' products: cuBLAS against the split-K Triton launches (GTUNE_ARGS, e.g. --only W7)
      timeout -k 15 "${GTUNE_S:-400}" python3 recipes/bench/gemm_tuning.py --out "$OUT/gemm_tuning.json" ${GTUNE_ARGS:-} \
        > "$OUT/gemm_tuning.md" 2> "$OUT/gemm_tuning.err" || echo "gtune: exited with status $?"
      SUMMARIES+=("$OUT/gemm_tuning.md") ;;
    gemm) # the decode steps' matrix products alone in CUDA graphs, against the copy and matmul bounds
      timeout -k 15 120 python3 recipes/bench/gemm_shapes.py --out "$OUT/gemm_shapes.json" > "$OUT/gemm_shapes.md" \
        2> "$OUT/gemm_shapes.err" || echo "gemm: exited with status $?"
      SUMMARIES+=("$OUT/gemm_shapes.md")
      PYTHONPATH=plugin${PYTHONPATH:+:$PYTHONPATH} timeout -k 15 150 python3 recipes/bench/graph_launch.py \
        --workload conf/workload/w1.yaml --out "$OUT/graph_launch.json" > "$OUT/graph_launch.md" 2> "$OUT/graph_launch.err" \
        || echo "graph_launch: exited with status $?"
      SUMMARIES+=("$OUT/graph_launch.md") ;;
    probe) # one prefill step and one decode graph replay of each workload, GPU ms by kernel
      for w in ${PROBE_WORKLOADS:-w1 w7}; do
        PYTHONPATH=plugin${PYTHONPATH:+:$PYTHONPATH} timeout -k 15 "${PROBE_S:-200}" python3 recipes/bench/step_probe.py \
          --workload "conf/workload/$w.yaml" --out "$OUT/probe_$w.json" ${PROBE_ARGS:-} > "$OUT/probe_$w.md" \
          2> "$OUT/probe_$w.err" || echo "probe $w: exited with status $?"
        SUMMARIES+=("$OUT/probe_$w.md")
      done ;;
    host) # the engine's host work per step with the model stubbed out, on this machine's CPU (W1's requests)
      PYTHONPATH=plugin${PYTHONPATH:+:$PYTHONPATH} timeout -k 15 120 python3 recipes/bench/host_step.py \
        --out "$OUT/host_step.json" > "$OUT/host_step.md" 2> "$OUT/host_step.err" || echo "host: exited with status $?"
      SUMMARIES+=("$OUT/host_step.md") ;;
    attention|ddp) bash recipes/run_on_h100.sh "$what" ;;
    tp)
      [ "${TP_TESTS:-1}" = 1 ] && { timeout -k 15 "${TP_TESTS_S:-420}" python3 -m pytest -v -p no:cacheprovider -m gpu \
        -k "${TP_TESTS_K:-}" tests/test_gpu_tensor_parallel.py > "$OUT/tp_tests.log" 2>&1; tail -12 "$OUT/tp_tests.log"; }
      export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
      export PYTHONPATH=plugin${PYTHONPATH:+:$PYTHONPATH}
      [ "${TP_ALLREDUCE:-1}" = 1 ] && { timeout -k 15 120 torchrun --nproc-per-node=2 recipes/bench/allreduce_latency.py \
        --out "$OUT/tp/allreduce.json" > "$OUT/tp_allreduce.log" 2>&1 || echo "tp: allreduce_latency exited $?"; }
      tp_batcher=${TP_BATCHER:-'{"max_num_seqs": 32}'}  # BatcherConfig overrides (JSON) of every TP run
      merge() { python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d.update(json.loads(sys.argv[2])); print(json.dumps(d))' "$tp_batcher" "$1"; }
      for run in ${TP_RUNS:-tp1 tp2 tp2_nccl tp2_unfused 70b}; do  # one line per run, as each ends
        case "$run" in
          tp1) cmd=(python3) extra=() b=$tp_batcher ;;
          tp2) cmd=(torchrun --nproc-per-node=2) extra=() b=$tp_batcher ;;
          tp2_nccl) cmd=(torchrun --nproc-per-node=2) extra=() b=$(merge '{"tp_all_reduce": "nccl"}') ;;
          tp2_unfused) cmd=(torchrun --nproc-per-node=2) extra=() b=$(merge '{"fuse_projections": false}') ;;
          tp2_plain) cmd=(torchrun --nproc-per-node=2) extra=() b=$(merge '{"fuse_projections": false, "tp_all_reduce": "nccl"}') ;;
          70b) cmd=(torchrun --nproc-per-node=2) extra=(--shape llama70b) b=$tp_batcher ;;
          *) echo "tp: unknown run $run (tp1 tp2 tp2_nccl tp2_unfused tp2_plain 70b)"; continue ;;
        esac
        [ -n "${TP_PROFILE:-}" ] && extra+=(--profile "$TP_PROFILE")
        timeout -k 15 "${TP_RUN_S:-240}" "${cmd[@]}" recipes/bench/tp_bench.py --workload conf/workload/w3.yaml \
          --batcher "$b" "${extra[@]}" --out "$OUT/tp/$run.json" > "$OUT/tp_$run.log" 2>&1 || echo "tp: $run exited $?"
        grep "^\[tp\]" "$OUT/tp_$run.log" | sed "s/^\[tp\]/[tp $run]/" | tee -a "$OUT/tp.log"
      done
      SUMMARIES+=("$OUT/tp_tests.log" "$OUT/tp_allreduce.log" "$OUT/tp.log") ;;
    *) echo "unknown step $what (steps: tests soak w1 w2 w2s w3 w4 w5 w6 w7 s1 sampling eval atune gtune gemm probe host attention ddp tp)" >&2 ;;
  esac
done

summary=$(for f in "${SUMMARIES[@]}"; do  # read before pack() folds the step folders
  [ -f "$f" ] || continue
  echo; echo "==== $(basename "$f")"
  case "$f" in
    *.md) grep -v -E '^- (% matrix rate =|start-up s:|wall s:|GPU busy %|TTFT:|CPU ms/step)' "$f" ;;
    *) tail -25 "$f" ;;
  esac
done)
pack
echo "$summary"  # the tables last, so that the call's output tail holds them
