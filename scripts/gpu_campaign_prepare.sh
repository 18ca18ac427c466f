#!/usr/bin/env bash
# Fetch, on a machine that reaches PyPI, everything scripts/gpu_campaign.sh installs on the GPU
# machine (which reaches no registry): wheels for CPython 3.12 / manylinux x86_64 and the two CUDA
# sdists, into an ignored folder that the device call carries. Then check the folder: one version
# per package, no missing requirement we could carry, under the 64 MiB a call may carry, and print
# the one device call to make.
#
# usage: scripts/gpu_campaign_prepare.sh [--no-lm-eval] [--dest DIR]
#   --no-lm-eval  leave out lm-eval and its dependencies (about 13 MB; the campaign then skips
#                 the local lm-eval tasks, everything else runs)
#   --dest DIR    target folder (default .whl, relative to the repository root)
# env: PYTHON (default .venv/bin/python, else python3): the interpreter whose pip downloads.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

DEST=.whl
WITH_LM_EVAL=1
while [[ $# -gt 0 ]]; do
  case $1 in
    --no-lm-eval) WITH_LM_EVAL=0 ;;
    --dest) DEST=$2; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "gpu_campaign_prepare: unknown argument $1 (allowed: --no-lm-eval, --dest DIR)" >&2
       exit 2 ;;
  esac
  shift
done
PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
CARRY_LIMIT=$((64 * 1024 * 1024))

# Pinned: the versions this repository's CPU environment was tested with, where it has them.
# What the GPU image lacks for archbench itself:
CORE=(hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3)
# RWKV-7's Triton kernels and the fla peer (pure Python + Triton):
FLA=(flash-linear-attention==0.6.0 fla-core==0.6.0)
# lm-eval and the dependencies the image lacks (the image has numpy, pandas, pyarrow, jinja2,
# scikit-learn, sacrebleu, xxhash, fsspec, huggingface-hub, requests, tqdm, absl-py, click,
# joblib, regex, six):
LM_EVAL=(lm-eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19
         pytablewriter==1.2.1 dataproperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1
         tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1
         rouge-score==0.1.2 nltk==3.10.4 defusedxml==0.7.1 sqlitedict==2.1.0 word2number==1.1
         more-itertools==11.2.1)
# Built on the GPU machine for sm_90 only (scripts/gpu_campaign.sh patches their arch lists):
SDISTS=(causal-conv1d==1.7.0 mamba-ssm==2.3.2.post1)

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64)

mkdir -p "$DEST"
grep -qxF "/$DEST/" .git/info/exclude 2>/dev/null || {
  mkdir -p .git/info && echo "/$DEST/" >> .git/info/exclude
  echo "added /$DEST/ to .git/info/exclude"
}

fetch_wheel() {  # a binary wheel for the GPU machine's interpreter, else build a pure one here
  local spec=$1
  if "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${PLATFORMS[@]}" -d "$DEST" "$spec" 2>/dev/null; then
    return 0
  fi
  echo "  $spec: no wheel on PyPI; building a pure-Python wheel from its sdist"
  "$PYTHON" -m pip wheel -q --no-deps -w "$DEST" "$spec"
}

specs=("${CORE[@]}" "${FLA[@]}")
[[ $WITH_LM_EVAL == 1 ]] && specs+=("${LM_EVAL[@]}")
echo "fetching ${#specs[@]} wheels into $DEST/ ..."
for spec in "${specs[@]}"; do
  fetch_wheel "$spec"
done
echo "fetching the CUDA sdists: ${SDISTS[*]}"
# Their setup scripts import torch and look for nvcc even to report metadata; SKIP_CUDA_BUILD
# lets that step run here (the build itself happens on the GPU machine).
MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
  "$PYTHON" -m pip download -q --no-deps --no-build-isolation --no-binary=:all: -d "$DEST" \
  "${SDISTS[@]}"

git rev-parse HEAD > "$DEST/campaign_commit.txt" 2>/dev/null || echo unknown > "$DEST/campaign_commit.txt"
if [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then
  echo "working tree had uncommitted changes to tracked files when prepared" >> "$DEST/campaign_commit.txt"
fi

"$PYTHON" - "$DEST" "$CARRY_LIMIT" <<'EOF'
"""Check the folder: one version per package, requirements carried or left to the image, size."""
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename

dest, limit = Path(sys.argv[1]), int(sys.argv[2])
env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
       "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
       "implementation_name": "cpython", "extra": ""}
names: dict[str, list[str]] = {}
needs: dict[str, set[str]] = {}
for path in sorted(dest.iterdir()):
    if path.suffix == ".whl":
        name = canonicalize_name(parse_wheel_filename(path.name)[0])
        with zipfile.ZipFile(path) as zf:
            meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            for line in zf.read(meta).decode().splitlines():
                if line.startswith("Requires-Dist:"):
                    req = Requirement(line.split(":", 1)[1].strip())
                    if req.marker is None or req.marker.evaluate(env):
                        needs.setdefault(canonicalize_name(req.name), set()).add(name)
    elif path.name.endswith(".tar.gz"):
        name = canonicalize_name(parse_sdist_filename(path.name)[0])
    else:
        continue
    names.setdefault(name, []).append(path.name)
dupes = {n: f for n, f in names.items() if len(f) > 1}
if dupes:
    sys.exit(f"more than one version of a package (pip would refuse the install): {dupes}")
left = sorted(n for n in needs if n not in names)
print(f"{len(names)} packages; requirements not carried, expected on the GPU image: "
      + ", ".join(f"{n} (for {', '.join(sorted(needs[n]))})" for n in left))
size = sum(p.stat().st_size for p in dest.iterdir() if p.is_file())
print(f"{dest}/: {size / 2**20:.1f} MiB")
if size > limit:
    sys.exit(f"{dest}/ is {size / 2**20:.1f} MiB: over the {limit / 2**20:.0f} MiB a call carries")
EOF

tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb 2>/dev/null \
        | tail -1 | cut -f1)
carried=$(du -sb "$DEST" | cut -f1)
total=$((tree + carried))
echo "working tree that travels: $((tree / 1024)) KiB; with $DEST/: $((total / 1024)) KiB" \
     "(limit $((CARRY_LIMIT / 1024)) KiB)"
if (( total > CARRY_LIMIT )); then
  echo "over the carry limit: drop lm-eval (--no-lm-eval) or untracked files" >&2
  exit 1
fi
cat <<EOF

Ready. Commit your work first (the GPU machine gets the working tree as it is now), then make
ONE device call (timeout_s 600; the script stops itself after CAMPAIGN_BUDGET_S=540 s):

  run(command="bash scripts/gpu_campaign.sh", carry=["$DEST"], timeout_s=600)

What comes back under \$OUT (7 files): campaign.log, stages.tsv, provenance.txt, install.tgz,
tests.tgz, results.tgz, report.tgz (README.md, section GPU, says what each holds).
EOF
