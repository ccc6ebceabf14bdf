"""Times diffusers' AutoencoderKLWan decoding a model folder's latents at its generation size,
the work `vidit bench` reports as "VAE decode" for that folder (random latents, frame by frame
with the causal cache, as both implementations decode). Prints JSON with the keys of `vidit
bench --json`'s `vae_decode`.

Run by hand in the reference virtual environment (tools/parity/requirements.txt), never in CI:

    python tools/bench/peer_vae.py models/shapes --threads 2
"""

import argparse
import json

import torch
from diffusers import AutoencoderKLWan

from peer_diffusers import median_ms


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", help="a model folder (diffusers layout) with vae/ and generation_config.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    torch.manual_seed(0)

    vae = AutoencoderKLWan.from_pretrained(f"{args.model}/vae", torch_dtype=torch.float32).eval()
    with open(f"{args.model}/generation_config.json") as f:
        generation = json.load(f)
    spatial, temporal = vae.config.scale_factor_spatial, vae.config.scale_factor_temporal
    frames = generation["num_frames"]
    shape = (1, vae.config.z_dim, (frames - 1) // temporal + 1, generation["height"] // spatial, generation["width"] // spatial)
    latents = torch.randn(shape)

    ms = median_ms(lambda: vae.decode(latents), args.warmup, args.iters)
    print(json.dumps({"frames": frames, "ms": ms, "ms_per_frame": ms / frames}))


if __name__ == "__main__":
    main()
