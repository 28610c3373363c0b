#!/usr/bin/env bash
# Download, once, the Python packages the GPU machine lacks into .whl/ (git-ignored); every device call that runs
# recipes/run_on_h200.sh carries it (carry: [".whl"]) and the script installs it there with --no-index --no-deps.
#   bash recipes/fetch_wheels.sh          # hydra-core, omegaconf, antlr4-python3-runtime (every benchmark step)
#   bash recipes/fetch_wheels.sh eval     # + lm_eval and the dependencies the machine lacks (the eval step)
# The machine has Python 3.12 (x86-64) with torch, transformers, lightning, numpy, pandas, pyarrow, scikit-learn,
# sacrebleu, jinja2, xxhash, fsspec, huggingface-hub, requests, aiohttp, click, joblib, regex, tqdm, absl-py, six,
# python-dateutil (its list: /work/.library/device/KINDS.md); only what is missing is fetched, one version each.
# Pure-Python packages published only as source (antlr4, rouge-score, sqlitedict, word2number) are built here into
# py3-none-any wheels. Versions: those the project is tested with on CPU.
set -euo pipefail
DEST=${DEST:-.whl}
mkdir -p "$DEST"
PLATFORM=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
BASE=(hydra-core==1.3.2 omegaconf==2.3.0)
BASE_SDIST=(antlr4-python3-runtime==4.9.3)
EVAL=(lm_eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 more-itertools==11.2.1
      pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5
      tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1 pytz==2026.6 nltk==3.10.4 defusedxml==0.7.1)
EVAL_SDIST=(rouge-score==0.1.2 sqlitedict==2.1.0 word2number==1.1)

wanted=("${BASE[@]}") sdists=("${BASE_SDIST[@]}")
if [ "${1:-}" = eval ]; then wanted+=("${EVAL[@]}"); sdists+=("${EVAL_SDIST[@]}"); fi
python3 -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$DEST" "${wanted[@]}"
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "${sdists[@]}"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || grep -qx '/.whl/' .gitignore 2>/dev/null || echo "note: add /.whl/ to .gitignore"
ls -1 "$DEST"
du -sh "$DEST"   # a device call carries at most 64 MiB in all
