#!/bin/bash
# Builds tests/fixtures/media: H.264 streams from ffmpeg/x264 that vidit's MP4 reader is tested on.
# Run by hand (needs ffmpeg with libx264, and Python with Pillow + NumPy), never in CI:
#     PYTHON=/root/vidit-ref/bin/python bash tools/parity/make_media_fixtures.sh
# Built with: ffmpeg 5.1.9-0+deb12u1 (Debian 12, libx264), Pillow 13.0.0, NumPy 2.4.6.
set -euo pipefail
out=${1:-tests/fixtures/media}
mkdir -p "$out/bframes_source"
# The source: a white square moving 3 px a frame over a colour gradient, 16 frames of 64x48.
"${PYTHON:-python3}" - "$out/bframes_source" <<'PY'
import sys
import numpy as np
from PIL import Image
y, x = np.mgrid[0:48, 0:64]
for i in range(16):
    img = np.stack([x * 4, y * 5, np.full_like(x, 60)], -1).astype(np.uint8)
    img[14:30, 2 + 3 * i : 14 + 3 * i] = 255
    Image.fromarray(img).save(f"{sys.argv[1]}/frame_{i + 1:02d}.png")
PY
src="$out/bframes_source/frame_%02d.png"
# High profile with up to 3 B-frames: decode order differs from display order.
ffmpeg -v error -y -framerate 8 -i "$src" -c:v libx264 -preset medium -profile:v high -bf 3 -crf 16 -pix_fmt yuv420p "$out/bframes_x264.mp4"
# What openh264 cannot decode: 4:4:4 and 10-bit.
ffmpeg -v error -y -framerate 8 -i "$src" -c:v libx264 -profile:v high444 -pix_fmt yuv444p -crf 16 -frames:v 4 "$out/yuv444_x264.mp4"
ffmpeg -v error -y -framerate 8 -i "$src" -c:v libx264 -profile:v high10 -pix_fmt yuv420p10le -crf 16 -frames:v 4 "$out/yuv420p10_x264.mp4"
ffprobe -v error -show_frames -select_streams v "$out/bframes_x264.mp4" | grep pict_type | sort | uniq -c
