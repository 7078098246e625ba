#!/usr/bin/env bash
# The project's CUDA checks in one run (about 7 minutes on one GPU), one JSON of results.
#
# Usage: bash benchmarks/gpu.sh [--json FILE] [--data DIR]
#   --json FILE  where to write the merged results (default benchmarks/results/gpu.json)
#   --data DIR   folder holding the Fashion-MNIST IDX files (exported as BILEVEL_DATA)
# An unknown option, or --json / --data without a value: a message and exit 2.
#
# Parts, each under its own `timeout`; a failed or timed-out part is recorded and the
# next one runs:
#   tests      the CUDA tests: pytest -m '' -k cuda (they skip themselves without CUDA)
#   hvp        HVP / gradient ratios, batched k = 1..64 (hypergrad.py --sections hvp)
#   ridge      ridge hypergradients, implicit CG included (hypergrad.py --sections ridge)
#   distill    one distillation outer step, Fashion-MNIST, ConvNet-3 width 128, IPC 10, against
#              a hand-written BPTT (distill_step.py)
#   maml       MAML meta-gradient, 32 and 128 tasks, against the peers (maml.py)
#   scale      implicit hypergradient through a 100 M-parameter transformer (scale.py)
#
# Needs a python whose torch sees CUDA: .venv/bin/python if it has one, else python3.
# It installs nothing. Without a visible CUDA device it says so and exits 0 having run
# nothing; with a GPU but a torch without CUDA it says what to install and exits 2.
# Otherwise it exits 0 when every part passed, 1 when one failed or timed out (the JSON
# is written either way, with the tail of the failed part's log).
set -u
cd "$(dirname "$0")/.."

OUT=benchmarks/results/gpu.json
needs_value() {  # needs_value OPTION NUMBER-OF-ARGUMENTS-LEFT [NEXT]: exit 2 if none given
    if [ "$2" -lt 2 ] || [ -z "$3" ] || [ "${3#--}" != "$3" ]; then
        echo "gpu.sh: $1 needs a value (see --help)" >&2
        exit 2
    fi
}
while [ $# -gt 0 ]; do
    case "$1" in
        --json) needs_value "$1" $# "${2-}"; OUT="$2"; shift 2 ;;
        --data) needs_value "$1" $# "${2-}"; export BILEVEL_DATA="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | grep '^#'; exit 0 ;;
        *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

# --- a python with a CUDA torch -----------------------------------------------------------
cuda_of() {  # prints "yes", "no" (torch without a usable CUDA device) or nothing (no torch)
    "$1" -c 'import torch; print("yes" if torch.cuda.is_available() else "no")' 2>/dev/null
}
PY=""
HAS_TORCH=""
for candidate in .venv/bin/python python3; do
    command -v "$candidate" >/dev/null 2>&1 || [ -x "$candidate" ] || continue
    answer=$(cuda_of "$candidate")
    [ -n "$answer" ] && HAS_TORCH="$candidate"
    if [ "$answer" = yes ]; then PY="$candidate"; break; fi
done
if [ -z "$PY" ]; then
    hidden=""
    if [ "${CUDA_VISIBLE_DEVICES-unset}" = "" ] || [ "${CUDA_VISIBLE_DEVICES-}" = "-1" ]; then
        hidden=" (CUDA_VISIBLE_DEVICES hides every device)"
    fi
    if [ -z "$hidden" ] && command -v nvidia-smi >/dev/null 2>&1 \
            && nvidia-smi -L 2>/dev/null | grep -q GPU; then
        if [ -n "$HAS_TORCH" ]; then
            echo "gpu.sh: a GPU is present but the torch of $HAS_TORCH" \
                 "($("$HAS_TORCH" -c 'import torch; print(torch.__version__)')) cannot use" \
                 "it: a CPU build, or a CUDA build newer than the driver." >&2
        else
            echo "gpu.sh: a GPU is present but neither .venv/bin/python nor python3 has" \
                 "torch." >&2
        fi
        echo "gpu.sh: install a CUDA build of torch into .venv or the system python, e.g." \
             "'pip install torch' (on Linux its default wheel bundles CUDA), plus the" \
             "package's dependencies and pytest: 'pip install -e .[dev]'." >&2
        exit 2
    fi
    echo "gpu.sh: no CUDA device visible to torch${hidden}: nothing run."
    exit 0
fi

# --- the parts ----------------------------------------------------------------------------
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
START=$(date +%s)

run_part() {  # run_part NAME SECONDS COMMAND...: status, seconds and log tail in WORK/NAME.*
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*"
    local t0 rc
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    echo $(( $(date +%s) - t0 )) > "$WORK/$name.seconds"
    echo "$rc" > "$WORK/$name.rc"
    tail -n 5 "$WORK/$name.log"
    echo "== $name: exit $rc after $(cat "$WORK/$name.seconds") s"
}

# limits: 460 s in all, so that the run ends within 8 minutes with the start-up and merge
run_part tests 75 "$PY" -m pytest -q -m '' -k cuda -p no:randomly -p no:cacheprovider \
    --junitxml="$WORK/tests.xml" tests
run_part hvp 70 "$PY" benchmarks/hypergrad.py --device cuda --sections hvp \
    --json "$WORK/hvp.json"
run_part ridge 80 "$PY" benchmarks/hypergrad.py --device cuda --sections ridge \
    --json "$WORK/ridge.json"
run_part distill 60 "$PY" benchmarks/distill_step.py --device cuda --dataset fashion_mnist \
    --net convnet --width 128 --ipc 10 --inner-steps 30 --rounds 10 --threads 4 \
    --json "$WORK/distill.json"
run_part maml 65 "$PY" benchmarks/maml.py --device cuda --tasks 32,128 --only speed \
    --rounds 10 --json "$WORK/maml.json"
run_part scale 110 "$PY" benchmarks/scale.py --device cuda --params 100M --rounds 3 \
    --json "$WORK/scale.json"

# --- one JSON -----------------------------------------------------------------------------
"$PY" - "$WORK" "$OUT" "$START" <<'EOF'
import json, sys, time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

work, out, start = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
          "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
          "total_seconds": int(time.time()) - start, "parts": {}}
for name in ("tests", "hvp", "ridge", "distill", "maml", "scale"):
    rc = int((work / f"{name}.rc").read_text())
    part = {"status": "ok" if rc == 0 else "timeout" if rc in (124, 137) else "failed",
            "exit_code": rc, "seconds": int((work / f"{name}.seconds").read_text())}
    if rc:
        part["log_tail"] = (work / f"{name}.log").read_text()[-3000:]
    data = work / f"{name}.json"
    if data.exists():
        part["results"] = json.loads(data.read_text())
    xml = work / f"{name}.xml"
    if xml.exists():
        cases = []
        for case in ET.parse(xml).iter("testcase"):
            outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")),
                           "passed")
            cases.append({"test": f"{case.get('classname')}::{case.get('name')}",
                          "outcome": outcome})
        part["results"] = cases
    result["parts"][name] = part
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(result, indent=1) + "\n")
print(f"gpu.sh: wrote {out} ("
      + ", ".join(f"{k} {v['status']}" for k, v in result["parts"].items()) + ")")
sys.exit(0 if all(v["status"] == "ok" for v in result["parts"].values()) else 1)
EOF
