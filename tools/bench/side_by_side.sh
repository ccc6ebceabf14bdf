#!/usr/bin/env bash
# vidit against diffusers / PyTorch on the same model and inputs, alternating in one run so that
# both see the same machine state; prints each round and the median ratio.
#   PYTHON=/path/to/venv/bin/python bash tools/bench/side_by_side.sh [ROUNDS]
# The venv: tools/parity/requirements.txt (pinned torch + diffusers). Run by hand, not in CI.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
rounds=${1:-3}
threads=${THREADS:-2}
cargo build --release -q -p vidit-cli
vidit=./target/release/vidit
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The moderate config's random weights and inputs, written once, read by both.
"$vidit" bench --config moderate --save "$work/moderate" --iters 1 --warmup 0 --json > /dev/null
for round in $(seq 1 "$rounds"); do
  RAYON_NUM_THREADS=$threads "$vidit" bench --config moderate --json > "$work/vidit_step_$round.json"
  "$PYTHON" tools/bench/peer_diffusers.py "$work/moderate" --threads "$threads" > "$work/peer_step_$round.json"
  RAYON_NUM_THREADS=$threads "$vidit" bench --train --json > "$work/vidit_train_$round.json"
  "$PYTHON" tools/bench/peer_train.py models/shapes --threads "$threads" > "$work/peer_train_$round.json"
  RAYON_NUM_THREADS=$threads "$vidit" bench --model models/shapes --json > "$work/vidit_builtin_$round.json"
  "$PYTHON" tools/bench/peer_vae.py models/shapes --threads "$threads" > "$work/peer_vae_$round.json"
done
"$PYTHON" - "$work" "$rounds" <<'EOF'
import json, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
load = lambda name, r: json.load(open(f"{work}/{name}_{r}.json"))
rows = {
    "denoising step with CFG (ms)": [(load("vidit_step", r)["denoising_step"]["step_cfg_ms"], load("peer_step", r)["step_cfg_ms"]) for r in range(1, rounds + 1)],
    "forward, no CFG (ms)": [(load("vidit_step", r)["denoising_step"]["forward_ms"], load("peer_step", r)["forward_ms"]) for r in range(1, rounds + 1)],
    "peak RSS, step benchmark (MB)": [(load("vidit_step", r)["peak_rss_mb"], load("peer_step", r)["peak_rss_mb"]) for r in range(1, rounds + 1)],
    "training step, built-in config (ms)": [(load("vidit_train", r)["train_step"]["ms"], load("peer_train", r)["ms"]) for r in range(1, rounds + 1)],
    "VAE decode, built-in model (ms)": [(load("vidit_builtin", r)["vae_decode"]["ms"], load("peer_vae", r)["ms"]) for r in range(1, rounds + 1)],
}
peer = load("peer_step", 1)
print(f"peer: {peer['peer']}; vidit output vs diffusers: max abs diff {peer['max_abs_diff_vs_vidit']:.2e}")
print(f"{'':38} {'vidit':>10} {'peer':>10} {'peer / vidit':>13}")
for name, pairs in rows.items():
    v = statistics.median(p[0] for p in pairs)
    p = statistics.median(p[1] for p in pairs)
    print(f"{name:38} {v:10.1f} {p:10.1f} {p / v:12.2f}x")
EOF
