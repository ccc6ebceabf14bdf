"""Times PyTorch eager training steps of the built-in model's DiT and text encoder, the work
`vidit bench --train` times: random latents, flow matching with per-token timesteps (0 on no
frame here), the text encoder and transformer forward, MSE, backward, gradient clipping at 1,
AdamW, EMA of the weights. Prints JSON with the keys of `vidit bench --train --json`.

Run by hand in the reference virtual environment (tools/parity/requirements.txt), never in CI:

    python tools/bench/peer_train.py models/shapes --threads 2 --batch-size 16
"""

import argparse
import json
import statistics
import time

import torch
from diffusers import WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", help="a model folder whose transformer/ and text_encoder/ configs to use")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    transformer = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(f"{args.model}/transformer"))
    text_encoder = UMT5EncoderModel(UMT5Config.from_pretrained(f"{args.model}/text_encoder"))
    with open(f"{args.model}/generation_config.json") as f:
        generation = json.load(f)
    with open(f"{args.model}/vae/config.json") as f:
        vae = json.load(f)
    spatial, temporal = vae.get("scale_factor_spatial", 8), vae.get("scale_factor_temporal", 4)
    frames = (generation["num_frames"] - 1) // temporal + 1
    h, w = generation["height"] // spatial, generation["width"] // spatial
    b, c = args.batch_size, transformer.config.in_channels
    _, ph, pw = transformer.config.patch_size
    tokens = frames * (h // ph) * (w // pw)
    seq = generation["max_sequence_length"]
    vocab = text_encoder.config.vocab_size

    params = list(transformer.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    latents = torch.randn(256, c, frames, h, w)

    def step():
        x0 = latents[torch.randint(0, latents.shape[0], (b,))]
        ids = torch.randint(0, vocab, (b, seq))
        mask = torch.zeros(b, seq, dtype=torch.long)
        mask[:, :6] = 1
        sigma = torch.sigmoid(torch.randn(b))
        sigma = 3 * sigma / (1 + 2 * sigma)
        noise = torch.randn_like(x0)
        xt = (1 - sigma.view(b, 1, 1, 1, 1)) * x0 + sigma.view(b, 1, 1, 1, 1) * noise
        timestep = (sigma * 1000).view(b, 1).expand(b, tokens).contiguous()
        text = text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state * mask.unsqueeze(-1)
        v = transformer(hidden_states=xt, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(v, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.mul_(0.995).add_(p, alpha=0.005)

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    ms = statistics.median(times)
    print(json.dumps({
        "peer": f"torch {torch.__version__} eager",
        "threads": torch.get_num_threads(),
        "batch_size": b,
        "tokens": tokens,
        "ms": ms,
        "samples_per_s": b * 1e3 / ms,
    }))


if __name__ == "__main__":
    main()
