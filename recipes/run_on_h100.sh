#!/usr/bin/env bash
# One device call's worth of GPU work, logs and tables under $OUT (the device machine has no hydra: carry .whl).
#   bash recipes/run_on_h100.sh tests|soak|w1|w2|w3|attention [...]
# Wheels: `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whl
#          hydra-core==1.3.2 omegaconf==2.3.0` and `pip wheel --no-deps antlr4-python3-runtime==4.9.3 -w .whl`.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
for what in "$@"; do
  case "$what" in
    tests) python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_triton_attention.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 ;;
    soak) SOAK_SECONDS=${SOAK_SECONDS:-300} python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu_soak.py 2>&1 | tee "$OUT/gpu_soak.log" | tail -5 ;;
    w1|w2|w3) python3 recipes/benchmark.py workload="$what" out_dir="$OUT/$what" ${BENCH_ARGS:-} > "$OUT/$what.log" 2>&1
              grep "^\[$what\]\|^| \|overhead" "$OUT/$what.log"; rm -rf "$OUT/$what/jobs" "$OUT/$what/timelines" ;;
    attention) python3 recipes/bench/attention_backends.py 2>&1 | tee "$OUT/attention_backends.md" ;;
    *) echo "unknown step $what" >&2 ;;
  esac
done
