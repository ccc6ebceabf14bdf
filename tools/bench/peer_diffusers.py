"""Times diffusers' WanTransformer3DModel on the model folder and inputs `vidit bench --save DIR`
wrote, checks that its output matches vidit's, and prints JSON in `vidit bench --json`'s keys.

Run by hand in the reference virtual environment (tools/parity/requirements.txt: pinned torch and
diffusers), never in CI:

    vidit bench --config moderate --save /tmp/moderate
    python tools/bench/peer_diffusers.py /tmp/moderate --threads 2

One denoising step with guidance is what diffusers' WanPipeline does: two transformer forwards
(prompt, then negative prompt; each projects the text and the cross-attention keys and values
again) and a UniPC step.
"""

import argparse
import json
import resource
import statistics
import time

import torch
from diffusers import UniPCMultistepScheduler, WanTransformer3DModel
from safetensors.torch import load_file


def median_ms(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", help="the folder `vidit bench --config NAME --save` wrote")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    model = WanTransformer3DModel.from_pretrained(f"{args.folder}/transformer", torch_dtype=torch.float32).eval()
    inputs = load_file(f"{args.folder}/inputs.safetensors")
    latents, timestep, text = inputs["latents"], inputs["timestep"], inputs["encoder_hidden_states"]

    def forward(x, t, ctx):
        return model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]

    output = forward(latents, timestep, text)
    diff = (output - inputs["vidit_output"]).abs().max().item()

    forward_ms = median_ms(lambda: forward(latents, timestep, text), args.warmup, args.iters)
    batched = (torch.cat([latents, latents]), torch.cat([timestep, timestep]), torch.cat([text, text]))
    forward_cfg_batched_ms = median_ms(lambda: forward(*batched), args.warmup, args.iters)

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    scheduler.set_timesteps(args.warmup + args.iters + 1)
    velocity = torch.randn_like(latents)
    state = {"sample": latents.clone()}

    def scheduler_step():
        t = scheduler.timesteps[scheduler.step_index or 0]
        state["sample"] = scheduler.step(velocity, t, state["sample"], return_dict=False)[0]

    scheduler_ms = median_ms(scheduler_step, args.warmup, args.iters)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "peer": f"diffusers {__import__('diffusers').__version__}, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "max_abs_diff_vs_vidit": diff,
        "forward_ms": forward_ms,
        "forward_cfg_batched_ms": forward_cfg_batched_ms,
        "scheduler_ms": scheduler_ms,
        # WanPipeline: two forwards (cond, uncond) + one scheduler step.
        "step_cfg_ms": 2 * forward_ms + scheduler_ms,
        "peak_rss_mb": peak_rss_mb,
    }))


if __name__ == "__main__":
    main()
