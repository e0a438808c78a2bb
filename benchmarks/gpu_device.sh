#!/bin/bash
# On a GPU machine without network, in the checkout's root (torch preinstalled): install the wheels that
# benchmarks/gpu_wheels.sh put in .gpuwheels/ into a scratch directory on PYTHONPATH, run benchmarks/gpu.py,
# then copy the JSON and the logs to $OUT.        OUT=/some/dir bash benchmarks/gpu_device.sh
# Two invocations under their own timeouts, so a slow one keeps the other's figures: the measurements
# (MAIN_S, default 400 s), then the fast tests under RECO_DEVICE=cuda merged into the same file (TESTS_S, 150 s).
# MEMORY_SIZE (default 1000000) is the memory the drop-in model's encode retrieves from.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/reco-gpu-out}; PY=${PY:-python3}; SITE=${SITE:-/tmp/reco-gpu-site}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu-log.txt") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RECO_OFFLINE=1
t0=$(date +%s); el() { echo $(( $(date +%s) - t0 ))s; }
if ls .gpuwheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpuwheels/*.whl ||
    $PY -c "import glob, zipfile; [zipfile.ZipFile(w).extractall('$SITE') for w in glob.glob('.gpuwheels/*.whl')]"
  export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  echo "no .gpuwheels/*.whl: run benchmarks/gpu_wheels.sh where there is network, and carry .gpuwheels" >&2
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
$PY -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
echo "setup done at $(el)"
R=benchmarks/results/gpu.json
timeout -k 10 "${MAIN_S:-400}" $PY benchmarks/gpu.py --steps ingest,train,encode,knn \
  --memory-size "${MEMORY_SIZE:-1000000}" ${GPU_ARGS:-}
echo "measurements rc $? at $(el)"
timeout -k 10 "${TESTS_S:-150}" $PY benchmarks/gpu.py --steps tests --merge --logs "$OUT" \
  --tests-limit $(( ${TESTS_S:-150} - 20 ))
echo "tests rc $? at $(el)"
cp -f "$R" "$OUT"/
ls -la "$OUT"
