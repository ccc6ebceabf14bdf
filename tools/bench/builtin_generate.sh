#!/usr/bin/env bash
# Times one clip from the built-in model with the default settings (64x64, 17 frames, 20 UniPC
# steps with CFG), end to end through the release binary, N runs (default 5).
#   bash tools/bench/builtin_generate.sh [N]
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q -p vidit-cli
n=${1:-5}
out=$(mktemp -d)
./target/release/vidit generate "a red circle moving left" --seed 0 --quiet --output "$out/warmup.mp4"
for i in $(seq 1 "$n"); do
  start=$(date +%s.%N)
  ./target/release/vidit generate "a red circle moving left" --seed "$i" --quiet --output "$out/clip$i.mp4"
  end=$(date +%s.%N)
  echo "run $i: $(echo "$end - $start" | bc) s"
done
rm -rf "$out"
