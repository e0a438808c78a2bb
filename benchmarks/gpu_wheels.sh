#!/bin/bash
# The wheels benchmarks/gpu_device.sh installs on a GPU machine without network, downloaded here into .gpuwheels/
# (ignored by git, carried to the device with the working tree). The GPU image has torch, torchvision, timm (and
# huggingface_hub), numpy, scipy, pyarrow, pillow, safetensors and pytest: only what it lacks comes here, pinned to
# the versions this checkout's venv runs, for CPython ${PYVER:-3.12} on manylinux x86_64. Also records the commit
# measured in .gpuwheels/COMMIT (the device gets the working tree without .git).
#   bash benchmarks/gpu_wheels.sh            (PY=python3, PYVER=3.12; must stay under 60 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
D=.gpuwheels
rm -rf "$D"
mkdir -p "$D"
PLAT=(--python-version "${PYVER:-3.12}" --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
# open_clip and its tokenizer; the embedded store; the metadata DB and its migrations; the CLI and tests'
# runner (click); CLIP_benchmark's metrics (its heavy extras, transformers and pycocoevalcap, are not imported by
# the metrics the tests use, so it comes without its declared dependencies) and scikit-learn's
WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 regex==2026.12.2 qdrant-edge-py==0.9.0
        SQLAlchemy==2.1.9 greenlet==3.5.6 alembic==1.20.1 Mako==1.4.3 MarkupSafe==3.0.4 typing_extensions==4.16.0
        click==8.5.1 tqdm==4.70.1 filelock==4.3.2 clip-benchmark==1.6.2 scikit-learn==1.9.1 joblib==1.6.0
        threadpoolctl==3.8.0)
"$PY" -m pip download -q --no-deps --only-binary=:all: "${PLAT[@]}" -d "$D" "${WHEELS[@]}"
if git rev-parse HEAD >/dev/null 2>&1; then
  dirty=$([ -n "$(git status --porcelain --untracked-files=no)" ] && echo dirty || echo clean)
  echo "$(git rev-parse HEAD) $dirty" > "$D/COMMIT"
fi
mib=$(( $(du -sk "$D" | cut -f1) / 1024 ))
ls "$D"
echo "$D: $(ls "$D"/*.whl | wc -l) wheels, ${mib} MiB"
if [ "$mib" -ge 60 ]; then echo "$D is ${mib} MiB: over the 60 MiB the device trip allows" >&2; exit 1; fi
