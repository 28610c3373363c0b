#!/usr/bin/env bash
# One device call's worth of GPU work, logs and tables under $OUT (the device machine has no hydra: carry .whl).
#   bash recipes/run_on_h100.sh tests|soak|w1|w2|w3|ddp|attention [...]
# Wheels: `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whl
#          hydra-core==1.3.2 omegaconf==2.3.0` and `pip wheel --no-deps antlr4-python3-runtime==4.9.3 -w .whl`.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site/hydra ]; then  # once per machine (parallel steps share it)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
for what in "$@"; do
  case "$what" in
    tests) # the engine's GPU tests, and every kernel test (fp32/fp16 ones are unmarked: CI runs them interpreted)
           python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py tests/test_triton_attention.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 ;;
    soak) SOAK_SECONDS=${SOAK_SECONDS:-300} python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu_soak.py 2>&1 | tee "$OUT/gpu_soak.log" | tail -5 ;;
    w1|w2|w3) python3 recipes/benchmark.py workload="$what" out_dir="$OUT/$what" ${BENCH_ARGS:-} > "$OUT/$what.log" 2>&1
              grep "^\[$what\]\|^| \|overhead" "$OUT/$what.log"; rm -rf "$OUT/$what/jobs" "$OUT/$what/timelines"
              tar czf "$OUT/$what/logs.tgz" -C "$OUT/$what" logs && rm -rf "$OUT/$what/logs" ;;
    ddp) # W1's shape through the main job, on 1 GPU then on 2 (DDP); DDP_REQUESTS: request counts; DDP_ARGS: overrides
         python3 recipes/bench/save_model.py w1 /tmp/w1_model > "$OUT/ddp.log" 2>&1
         for n in ${DDP_REQUESTS:-512 2048}; do for g in 1 2; do
           [ "$g" = 1 ] && tr="trainer=gpu" || tr="trainer=ddp trainer.devices=$g"
           t0=$EPOCHREALTIME
           python3 recipes/generate.py model=pretrained model.name=/tmp/w1_model data=random data.random_prompts="$n" \
             'data.prompt_len=[64,512]' data.batch_size=64 sampling.max_new_tokens=256 sampling.ignore_eos=true $tr \
             writer=none progress_bar=none show=0 hydra.run.dir="/tmp/ddp_${n}_$g" ${DDP_ARGS:-} >> "$OUT/ddp.log" 2>&1
           python3 -c "import json,sys,time; s=json.load(open('/tmp/ddp_${n}_$g/summary.json')); print(f'| $n | $g | {s[\"output_tokens\"]} | {s[\"wall_s\"]:.2f} | {s[\"startup_s\"]:.2f} | {s[\"output_tokens_per_s\"]:,.0f} | {time.time() - float(sys.argv[1]):.1f} |')" \
             "$t0" | tee -a "$OUT/ddp.md"
         done; done ;;
    attention) python3 recipes/bench/attention_backends.py 2>&1 | tee "$OUT/attention_backends.md" ;;
    *) echo "unknown step $what" >&2 ;;
  esac
done
