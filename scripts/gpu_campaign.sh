#!/usr/bin/env bash
# The first GPU campaign in one device call: install what the GPU image lacks (from the folder
# scripts/gpu_campaign_prepare.sh filled), build mamba-ssm and causal-conv1d for sm_90 only,
# run `pytest -m gpu`, benchmark every backbone of conf/arch at one size (bench=gpu_campaign:
# 2K and 32K tokens, bf16, train / prefill / decode / memory with the library peers, then the
# max-context search), a short `compare +preset=gpu` slice if time is left, and a report.
#
# usage: scripts/gpu_campaign.sh [--dry-run]
#   --dry-run (or DRY_RUN=1): everything but the GPU work, on this machine's CPU: the installs go
#   to a temporary folder (wheels this interpreter cannot load are listed and left out; the CUDA
#   sdists are unpacked and patched but not compiled), `pytest -m gpu --collect-only`, the bench
#   at bench=cpu_smoke / size micro / 128 tokens on one backbone, `compare ... compare.dry_run=true`,
#   the report, and the check of what $OUT would send back.
#
# Why the shape: device time is short (one call, at most 10 minutes), so the script keeps its own
# clock. Each stage runs under `timeout` with a budget taken from what is left before the
# deadline (CAMPAIGN_BUDGET_S after the start), keeping back enough for the report and the
# packing; a stage that fails or runs out of time is logged and the next one starts. Results are
# packed into $OUT after every step, because only what is under $OUT comes back (at most 8 files,
# 16 MiB each, 2 folders deep): campaign.log, stages.tsv, provenance.txt, install.tgz, tests.tgz,
# results.tgz, report.tgz. The CUDA builds run in the background while the backbones that do not
# need them are tested and benchmarked (campaign.log says which measurements overlapped a build).
#
# env (all optional):
#   OUT                  where results go (default: a new temporary folder)
#   CAMPAIGN_BUDGET_S    wall-clock budget of the whole script (default 540)
#   CAMPAIGN_BACKBONES   comma list (default: every conf/arch/*.yaml; dry run: transformer)
#   CAMPAIGN_SIZE        size preset (default m; dry run: micro)
#   CAMPAIGN_BUILD_S     budget of each CUDA build (default 300)
#   CAMPAIGN_COMPARE_BACKBONES  the compare slice's backbones (default transformer,mamba2,rwkv7)
#   CAMPAIGN_FAIL_STAGE  comma list of stage names to fail on purpose (tests the going-on)
#   WHEEL_DIR            the carried wheels and sdists (default .whl)
#   PYTHON               interpreter (default python3; dry run: .venv/bin/python if present)
# exit status: 0 when every stage that ran succeeded, 1 when one failed or timed out (stages.tsv
# says which; the stages after it still ran), 2 on a usage error.
set -uo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
REPO=$(cd "$(dirname "$SELF")/.." && pwd)
cd "$REPO" || exit 2

# ---- helpers (used by the driver and by each stage process) ---------------------------------

log() {
  local line
  line="[campaign $(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"
  echo "$line"
  echo "$line" >> "$OUT/campaign.log"
}

seconds_left() { echo $(( DEADLINE - $(date +%s) )); }

# budget CAP RESERVE: a stage's seconds, at most CAP, leaving RESERVE before the deadline.
budget() {
  local cap=$1 reserve=$2 left
  left=$(( $(seconds_left) - reserve ))
  (( left < cap )) && cap=$left
  (( cap < 0 )) && cap=0
  echo "$cap"
}

record() {  # stage status rc seconds budget note
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$OUT/stages.tsv"
}

# run_stage NAME BUDGET MIN FUNCTION [ARGS]: FUNCTION runs in its own process under `timeout`,
# its output in $LOGS/NAME.log; returns its exit status (skipped: 125).
run_stage() {
  local name=$1 secs=$2 min=$3 rc t0 took status
  shift 3
  if (( secs < min )); then
    log "stage $name: skipped (budget ${secs}s < the ${min}s it needs)"
    record "$name" skipped - 0 "$secs" "not enough time left"
    return 125
  fi
  log "stage $name: start (budget ${secs}s)"
  t0=$(date +%s)
  if [[ ",${CAMPAIGN_FAIL_STAGE:-}," == *",$name,"* ]]; then
    timeout -k 5 "$secs" bash -c 'echo "injected failure (CAMPAIGN_FAIL_STAGE)"; exit 3' \
      > "$LOGS/$name.log" 2>&1
  else
    timeout -k 10 "$secs" bash "$SELF" --stage "$@" > "$LOGS/$name.log" 2>&1
  fi
  rc=$?
  took=$(( $(date +%s) - t0 ))
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  record "$name" "$status" "$rc" "$took" "$secs" "$LOGS_REL/$name.log"
  log "stage $name: $status (exit $rc, ${took}s of ${secs}s)"
  if [[ $status != ok ]]; then
    tail -n 8 "$LOGS/$name.log" | sed 's/^/    | /' | tee -a "$OUT/campaign.log"
  fi
  return $rc
}

# pack NAME PATH...: $OUT/NAME.tgz from paths under $WORK (text results, no checkpoints), written
# beside and renamed, so a half-written archive never replaces a whole one.
pack() {
  local name=$1 max=$((16 * 1024 * 1024 - 65536)) size paths=() p
  shift
  for p in "$@"; do [[ -e $WORK/$p ]] && paths+=("$p"); done
  (( ${#paths[@]} )) || return 0
  local excl=(--exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' --exclude='*.npy'
              --exclude='*.so' --exclude='__pycache__' --exclude='site' --exclude='cache')
  tar -czf "$OUT/$name.tgz.part" -C "$WORK" "${excl[@]}" "${paths[@]}" 2>/dev/null
  size=$(stat -c %s "$OUT/$name.tgz.part")
  if (( size > max )); then  # plots and built wheels go first
    tar -czf "$OUT/$name.tgz.part" -C "$WORK" "${excl[@]}" --exclude='*.png' --exclude='*.whl' \
      "${paths[@]}" 2>/dev/null
    log "pack $name: $((size / 1024)) KiB is over 16 MiB; packed again without plots and wheels"
  fi
  mv -f "$OUT/$name.tgz.part" "$OUT/$name.tgz"
}

# ---- stage bodies (each runs as `gpu_campaign.sh --stage NAME ...`) -------------------------

s_provenance() {
  local f=$OUT/provenance.txt
  {
    echo "== campaign"
    echo "mode: $MODE; budget ${BUDGET_S}s; started $(date -u -d "@$START" +%FT%TZ)"
    echo "host: $(uname -a)"
    echo "cpus: $(nproc); $(grep MemTotal /proc/meminfo 2>/dev/null)"
    echo "== source"
    if git -C "$REPO" rev-parse HEAD > /dev/null 2>&1; then
      echo "git commit: $(git -C "$REPO" rev-parse HEAD)"
      echo "tracked files changed since: $(git -C "$REPO" status --porcelain --untracked-files=no | wc -l)"
    elif [[ -f $WHEEL_DIR/campaign_commit.txt ]]; then
      echo "git commit (written by gpu_campaign_prepare.sh): $(cat "$WHEEL_DIR/campaign_commit.txt")"
    else
      echo "git commit: unknown (no .git and no $WHEEL_DIR/campaign_commit.txt)"
    fi
    echo "== nvidia-smi"
    if command -v nvidia-smi > /dev/null; then
      nvidia-smi 2>&1
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
        --format=csv 2>&1
    else
      echo "nvidia-smi: not on PATH"
    fi
    echo "== nvcc"
    command -v nvcc > /dev/null && nvcc --version 2>&1 | tail -n 2 || echo "nvcc: not on PATH"
    echo "ninja: $(command -v ninja || echo 'not on PATH (CUDA builds would compile serially)')"
    echo "== python / torch"
    "$PYTHON" - <<'EOF' 2>&1
import platform
import sys

print("python", sys.version.split()[0], sys.executable)
import torch

print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn",
      torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB")
else:
    print("no CUDA device visible to torch", platform.machine())
EOF
  } >> "$f"
}

s_versions() {  # s_versions WHEN: versions of the packages; "after the builds" also imports them
  {
    echo "== packages ($1; PYTHONPATH=$SITE)"
    PYTHONPATH=$SITE "$PYTHON" -P - "$1" <<'EOF' 2>&1
import importlib
import importlib.metadata as md
import sys

for dist in ("torch", "triton", "transformers", "einops", "hydra-core", "omegaconf",
             "antlr4-python3-runtime", "flash-linear-attention", "fla-core", "lm_eval",
             "datasets", "mamba_ssm", "causal_conv1d", "archbench"):
    try:
        print(f"{dist}=={md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist}: not installed")
if sys.argv[1] != "after the builds":
    sys.exit()
for mod in ("hydra", "fla.ops.rwkv7", "lm_eval", "causal_conv1d_cuda", "selective_scan_cuda",
            "mamba_ssm.ops.triton.ssd_combined"):
    try:
        m = importlib.import_module(mod)
        print(f"import {mod}: ok ({getattr(m, '__file__', '')})")
    except Exception as exc:
        print(f"import {mod}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
EOF
  } >> "$OUT/provenance.txt"
}

# Wheels this interpreter can install (the carried ones are for CPython 3.12; a dry run on another
# interpreter installs the rest and names what it left out).
usable_wheels() {
  "$PYTHON" - "$WHEEL_DIR" <<'EOF'
import sys
from pathlib import Path

from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename

ours = set(sys_tags())
for path in sorted(Path(sys.argv[1]).glob("*.whl")):
    if ours & set(parse_wheel_filename(path.name)[3]):
        print(path)
    else:
        print(f"left out (tags do not fit this interpreter): {path.name}", file=sys.stderr)
EOF
}

s_install() {
  mkdir -p "$SITE" "$WORK/src"
  local wheels=()
  if compgen -G "$WHEEL_DIR/*.whl" > /dev/null; then
    mapfile -t wheels < <(usable_wheels)
  else
    echo "no wheels in $WHEEL_DIR (run scripts/gpu_campaign_prepare.sh where PyPI is reachable)"
  fi
  # archbench itself, from a copy of this tree (a build never writes into the checkout), in the
  # same pip call as the wheels: one call, one bin/ folder for the console scripts.
  tar -cf - --exclude=./.git --exclude=./.venv --exclude=./.whl --exclude=./runs \
      --exclude=./multirun --exclude=./build --exclude='*.egg-info' . | tar -xf - -C "$WORK/src"
  echo "installing ${#wheels[@]} wheels and archbench (from this tree) into $SITE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --no-cache-dir --target "$SITE" "${wheels[@]}" "$WORK/src" || return 1
  PYTHONPATH=$SITE "$PYTHON" -P -c "import archbench.cli, hydra, omegaconf; print('archbench', \
archbench.cli.__file__)"
}

# Keep only the sm_90 -gencode pair of a setup.py that lists many architectures.
patch_sm90() {
  "$PYTHON" - "$1" <<'EOF'
import ast
import re
import sys
from pathlib import Path

path = Path(sys.argv[1])
text = path.read_text()
pair = re.compile(r'cc_flag\.append\("-gencode"\)\s*\n\s*'
                  r'cc_flag\.append\("arch=compute_(\w+),code=sm_\w+"\)')
dropped = []


def keep_90(m: re.Match) -> str:
    if m.group(1) == "90":
        return m.group(0)
    dropped.append(m.group(1))
    return f"pass  # sm_{m.group(1)} dropped: gpu_campaign builds for sm_90 only"


text = pair.sub(keep_90, text)
kept = re.findall(r"arch=compute_(\w+)", text)
if kept != ["90"]:
    sys.exit(f"{path}: expected exactly one remaining arch (90), found {kept}; not building")
ast.parse(text)
path.write_text(text)
print(f"{path}: sm_90 only (dropped {', '.join(dropped)})")
EOF
}

# s_build PKG FORCE_VAR MODULE JOBS: unpack the sdist, patch it to sm_90, build a wheel, install it.
s_build() {
  local pkg=$1 force_var=$2 module=$3 jobs=$4 sdist src
  if compgen -G "$WHEEL_DIR/${pkg}-*linux*.whl" > /dev/null; then
    echo "$pkg: a prebuilt wheel was carried and installed with the others; no build"
    PYTHONPATH=$SITE "$PYTHON" -P -c "import $module" && return 0
    return 1
  fi
  sdist=$(compgen -G "$WHEEL_DIR/${pkg}-*.tar.gz" | head -n 1)
  if [[ -z $sdist ]]; then
    echo "$pkg: no sdist in $WHEEL_DIR: the kernel path that needs it is unavailable"
    return 1
  fi
  mkdir -p "$WORK/build" "$WORK/built"
  tar -xzf "$sdist" -C "$WORK/build" || return 1
  src=$WORK/build/$(basename "$sdist" .tar.gz)
  patch_sm90 "$src/setup.py" || return 1
  cp "$src/setup.py" "$LOGS/setup_${pkg}_sm90.py"
  if [[ $MODE == dry-run ]]; then
    echo "dry run: CUDA build of $pkg skipped (no GPU here); on the GPU: TORCH_CUDA_ARCH_LIST=9.0" \
         "$force_var=TRUE MAX_JOBS=$jobs pip wheel --no-build-isolation $src"
    return 0
  fi
  echo "building $pkg for sm_90 with MAX_JOBS=$jobs"
  env TORCH_CUDA_ARCH_LIST=9.0 "$force_var=TRUE" MAX_JOBS="$jobs" PYTHONPATH="$SITE" \
    "$PYTHON" -m pip wheel -v --no-index --no-deps --no-build-isolation --no-cache-dir \
    -w "$WORK/built" "$src" || return 1
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WORK/built/${pkg}"-*.whl || return 1
  PYTHONPATH=$SITE "$PYTHON" -P -c "import $module; print('$module imports')"
}

s_tests() {  # s_tests PHASE KEYWORDS
  local phase=$1 keywords=$2 rc args
  args=(-m gpu -k "$keywords" -p no:cacheprovider)
  mkdir -p "$WORK/tests"
  if [[ $MODE == dry-run ]]; then
    args+=(--collect-only -q)
  else
    args+=(-q -rs --junitxml "$WORK/tests/junit_$phase.xml")
  fi
  # -P: the checkout's own archbench/ folder must not shadow the installed package
  PYTHONPATH=$SITE "$PYTHON" -P -m pytest "${args[@]}" tests
  rc=$?
  if (( rc == 5 )); then echo "no tests selected"; return 0; fi
  return $rc
}

s_bench() {  # s_bench ARCH PASS
  local arch=$1 pass=$2 out=$WORK/results/bench/$1/$2 ov=()
  mkdir -p "$out"
  if [[ $MODE == dry-run ]]; then
    ov=(bench=cpu_smoke 'bench.contexts=[128]' bench.isolate=false bench.warmup=1
        bench.repeats=2 bench.min_seconds=0 bench.max_seconds=0.5 bench.decode_tokens=4)
    [[ $pass == maxctx ]] && ov+=('bench.modes=[max_context]' bench.max_context_limit=256
                                 bench.max_context_step=128)
  else
    ov=(bench=gpu_campaign)
    [[ $pass == maxctx ]] && ov+=('bench.modes=[max_context]' 'bench.contexts=[32768]'
                                 bench.isolate=true)
  fi
  PYTHONPATH=$SITE "$ARCHBENCH" bench "arch=$arch" "size=$SIZE" "${ov[@]}" "out_dir=$out" \
    "hydra.run.dir=$out"
}

s_compare() {
  local ov=(+preset=gpu "compare.backbones=[$COMPARE_BACKBONES]" compare.bench=false
            "compare.sweep_dir=$WORK/results/compare" "compare.out=$WORK/results/compare/report"
            '~compare.studies.mqar' '~compare.studies.induction' 'compare.studies.lm.train=[]'
            train.tokens=2e6)
  [[ $MODE == dry-run ]] && ov+=(compare.dry_run=true)
  PYTHONPATH=$SITE "$ARCHBENCH" compare "${ov[@]}"
}

s_report() {
  local inputs=()
  [[ -d $WORK/results/bench ]] && inputs+=("$WORK/results/bench")
  [[ -d $WORK/results/compare ]] && inputs+=("$WORK/results/compare")
  (( ${#inputs[@]} )) || { echo "nothing finished to report on"; return 1; }
  PYTHONPATH=$SITE "$ARCHBENCH" report "${inputs[@]}" -o "$WORK/report" \
    --title "archbench GPU campaign ($MODE, size $SIZE)"
}

# One line per record of a bench folder: what ran, which kernel path, the peer ratio.
summarize_bench() {
  PYTHONPATH=$SITE "$PYTHON" -P - "$1" <<'EOF' 2>&1 | sed 's/^/    /' | tee -a "$OUT/campaign.log"
import json
import sys
from pathlib import Path

path = Path(sys.argv[1]) / "records.jsonl"
if not path.is_file():
    print(f"no records in {path.parent}")
    sys.exit()
for line in path.read_text().splitlines():
    try:
        r = json.loads(line)
    except json.JSONDecodeError:
        print("unreadable record line")
        continue
    peer = r.get("peer") or {}
    speed = f"{r['tokens_per_s']:.0f} tok/s" if r.get("tokens_per_s") else ""
    mfu = f" mfu {r['mfu']:.3f}" if r.get("mfu") else ""
    ratio = f" ours/{peer.get('name')} {peer['ratio']:.2f}" if peer.get("ratio") else ""
    print(f"{r.get('arch')} {r.get('mode')} ctx={r.get('context')} {r.get('status')} {speed}{mfu}"
          f"{ratio} kernels={json.dumps(r.get('kernel_paths'), sort_keys=True)}")
EOF
}

# What $OUT would send back: at most 8 files, 16 MiB each, 64 MiB in all, 2 folders deep, names
# of letters, digits, '.', '_' and '-'.
check_out() {
  "$PYTHON" - "$OUT" <<'EOF'
import re
import sys
from pathlib import Path

out = Path(sys.argv[1])
files = [p for p in out.rglob("*") if p.is_file() or p.is_symlink()]
problems = []
if len(files) > 8:
    problems.append(f"{len(files)} files (at most 8 come back)")
for p in files:
    rel = p.relative_to(out)
    if len(rel.parts) > 3:
        problems.append(f"{rel}: more than 2 folders deep")
    if any(not re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts):
        problems.append(f"{rel}: a name with other characters")
    if p.is_symlink() or p.stat().st_size > 16 * 2**20:
        problems.append(f"{rel}: a link or over 16 MiB")
total = sum(p.stat().st_size for p in files if not p.is_symlink())
if total > 64 * 2**20:
    problems.append(f"{total / 2**20:.1f} MiB in all (at most 64)")
print(f"$OUT: {len(files)} files, {total / 2**10:.0f} KiB: "
      + ("; ".join(problems) if problems else "all come back"))
sys.exit(1 if problems else 0)
EOF
}

# Backbones whose mixers need the CUDA builds (mamba_ssm serves mamba and mamba2 mixers).
needs_build() {
  "$PYTHON" - "$REPO/conf/arch/$1.yaml" <<'EOF'
import sys

import yaml

mixers = (yaml.safe_load(open(sys.argv[1])) or {}).get("pattern", {}).get("mixers", [])
kinds = {str(m).split("*")[0].strip() for m in mixers}
sys.exit(0 if kinds & {"mamba", "mamba2"} else 1)
EOF
}

# ---- the driver ---------------------------------------------------------------------------

init() {
  DRY_RUN=${DRY_RUN:-0}
  for arg in "$@"; do
    case $arg in
      --dry-run) DRY_RUN=1 ;;
      -h|--help) sed -n '2,36p' "$SELF"; exit 0 ;;
      *) echo "gpu_campaign: unknown argument $arg (allowed: --dry-run, --help)" >&2; exit 2 ;;
    esac
  done
  if [[ $DRY_RUN == 1 ]]; then
    MODE=dry-run
    PYTHON=${PYTHON:-$([[ -x $REPO/.venv/bin/python ]] && echo "$REPO/.venv/bin/python" || echo python3)}
  else
    MODE=gpu
    PYTHON=${PYTHON:-python3}
  fi
  START=$(date +%s)
  BUDGET_S=${CAMPAIGN_BUDGET_S:-540}
  DEADLINE=$((START + BUDGET_S))
  OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_campaign_out.XXXXXX")}
  WORK=${CAMPAIGN_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_campaign_work.XXXXXX")}
  WHEEL_DIR=$(readlink -f "${WHEEL_DIR:-$REPO/.whl}")
  SITE=$WORK/site
  ARCHBENCH=$SITE/bin/archbench
  LOGS_REL=logs
  LOGS=$WORK/$LOGS_REL
  mkdir -p "$OUT" "$LOGS" "$WORK/results"
  if [[ $MODE == dry-run ]]; then
    SIZE=${CAMPAIGN_SIZE:-micro}
    BACKBONES=${CAMPAIGN_BACKBONES:-transformer}
  else
    SIZE=${CAMPAIGN_SIZE:-m}
    BACKBONES=${CAMPAIGN_BACKBONES:-$(cd conf/arch && ls ./*.yaml | sed 's|^\./||; s|\.yaml$||' \
                                      | paste -sd, -)}
  fi
  COMPARE_BACKBONES=${CAMPAIGN_COMPARE_BACKBONES:-transformer,mamba2,rwkv7}
  BUILD_S=${CAMPAIGN_BUILD_S:-300}
  RESERVE_FINAL=40   # the report and the last packing
  export MODE PYTHON START BUDGET_S DEADLINE OUT WORK WHEEL_DIR SITE ARCHBENCH LOGS LOGS_REL \
    SIZE COMPARE_BACKBONES
  export ARCHBENCH_CACHE=$WORK/cache PYTHONUNBUFFERED=1 PATH="$SITE/bin:$PATH"
  printf 'stage\tstatus\trc\tseconds\tbudget_s\tnote\n' > "$OUT/stages.tsv"
  : > "$OUT/campaign.log"
}

# bench_calls PASS WEIGHT ARCH...: one bench call per backbone; each gets its weight's share of
# the time left (minus what later stages keep back), so time a fast backbone leaves over goes on
# to the next. Globals: W_LEFT (weight of the bench calls still to run), KEEP (seconds kept back).
bench_calls() {
  local pass=$1 weight=$2 arch secs
  shift 2
  for arch in "$@"; do
    secs=$(( ( $(seconds_left) - KEEP ) * weight / W_LEFT ))
    (( secs > 300 )) && secs=300
    W_LEFT=$(( W_LEFT - weight ))
    local note=""
    [[ -n ${BUILD_PIDS:-} ]] && builds_running && note=" (CUDA builds still compiling on the CPUs)"
    [[ -n $note ]] && log "bench $arch/$pass overlaps the background CUDA builds$note"
    run_stage "bench_${arch}_$pass" "$secs" 15 s_bench "$arch" "$pass"
    summarize_bench "$WORK/results/bench/$arch/$pass"
    pack results results "$LOGS_REL"
  done
}

builds_running() {
  local pid
  for pid in $BUILD_PIDS; do kill -0 "$pid" 2> /dev/null && return 0; done
  return 1
}

main() {
  init "$@"
  log "mode $MODE, budget ${BUDGET_S}s, python $PYTHON, OUT=$OUT, work folder $WORK"
  run_stage provenance "$(budget 30 "$RESERVE_FINAL")" 5 s_provenance
  run_stage install "$(budget 120 "$RESERVE_FINAL")" 10 s_install
  run_stage versions_before_builds "$(budget 30 "$RESERVE_FINAL")" 5 s_versions "before the builds"
  if [[ ! -x $ARCHBENCH ]]; then
    log "archbench did not install: the bench, compare and report stages cannot run"
  fi
  pack install logs

  local group_a=() group_b=() arch
  IFS=, read -r -a all <<< "$BACKBONES"
  for arch in "${all[@]}"; do
    if [[ ! -f conf/arch/$arch.yaml ]]; then
      log "backbone $arch: no conf/arch/$arch.yaml; left out"
      record "backbone_$arch" skipped - 0 0 "no conf/arch/$arch.yaml"
    elif needs_build "$arch"; then
      group_b+=("$arch")
    else
      group_a+=("$arch")
    fi
  done
  log "backbones without CUDA builds: ${group_a[*]:-none}; needing mamba_ssm: ${group_b[*]:-none}"

  # The CUDA builds, in the background, each with its own budget.
  BUILD_PIDS=""
  run_stage build_causal_conv1d "$(budget "$BUILD_S" "$RESERVE_FINAL")" 30 \
    s_build causal_conv1d CAUSAL_CONV1D_FORCE_BUILD causal_conv1d_cuda 4 &
  BUILD_PIDS+=" $!"
  run_stage build_mamba_ssm "$(budget "$BUILD_S" "$RESERVE_FINAL")" 30 \
    s_build mamba_ssm MAMBA_FORCE_BUILD selective_scan_cuda 10 &
  BUILD_PIDS+=" $!"

  run_stage tests_without_mamba "$(budget 120 $((RESERVE_FINAL + 120)))" 20 \
    s_tests without_mamba "not mamba and not jamba"
  pack tests tests "$LOGS_REL"

  W_LEFT=$(( 3 * (${#group_a[@]} + ${#group_b[@]}) + ${#group_a[@]} + ${#group_b[@]} ))
  KEEP=$((RESERVE_FINAL + (${#group_b[@]} ? 60 : 0)))
  bench_calls core 3 "${group_a[@]}"
  bench_calls maxctx 1 "${group_a[@]}"

  log "waiting for the CUDA builds (each stops at its own budget)"
  wait $BUILD_PIDS
  grep -E '^build_' "$OUT/stages.tsv" | cut -f1,2 | sed 's/^/    /' | tee -a "$OUT/campaign.log"
  run_stage versions_after_builds "$(budget 30 "$RESERVE_FINAL")" 5 s_versions "after the builds"
  run_stage tests_mamba "$(budget 90 $((RESERVE_FINAL + 60)))" 20 \
    s_tests mamba "mamba or jamba"
  pack tests tests "$LOGS_REL"
  pack install logs built

  KEEP=$RESERVE_FINAL
  bench_calls core 3 "${group_b[@]}"
  bench_calls maxctx 1 "${group_b[@]}"

  run_stage compare "$(budget 400 "$RESERVE_FINAL")" 90 s_compare
  pack results results "$LOGS_REL"
  if compgen -G "$WORK/results/*/*" > /dev/null; then
    run_stage report "$(budget 60 10)" 5 s_report
  else
    log "stage report: skipped (no stage left results to report on)"
    record report skipped - 0 0 "nothing finished to report on"
  fi
  cp "$OUT/provenance.txt" "$WORK/report/" 2> /dev/null && pack report report
  check_out 2>&1 | tee -a "$OUT/campaign.log"
  local out_ok=${PIPESTATUS[0]} took
  record check_out "$([[ $out_ok == 0 ]] && echo ok || echo failed)" "$out_ok" 0 0 "what comes back"
  took=$(( $(date +%s) - START ))
  if (( took <= BUDGET_S )); then
    record budget ok 0 "$took" "$BUDGET_S" "finished within the budget"
  else
    record budget failed 1 "$took" "$BUDGET_S" "finished after the budget"
  fi
  log "done in ${took}s of ${BUDGET_S}s; stages: $(cut -f2 "$OUT/stages.tsv" | tail -n +2 \
      | sort | uniq -c | tr -s ' ' | paste -sd, -)"
  # the report folder holds the campaign's own account too, so it can be committed as it is
  cp "$OUT/campaign.log" "$OUT/stages.tsv" "$WORK/report/" 2> /dev/null && pack report report
  ! cut -f2 "$OUT/stages.tsv" | grep -qE '^(failed|timeout)$'
}

if [[ ${1:-} == --stage ]]; then
  shift
  "$@"
  exit $?
fi
main "$@"
