"""Builds vidit's parity fixtures with the reference implementation (diffusers / transformers).

Run by hand in a virtual environment outside the repository (see requirements.txt), never in CI:

    /root/vidit-ref/bin/python tools/parity/make_fixtures.py tests/fixtures

Everything is random-weight and tiny, float32 on CPU, seeded, so a rerun gives the same tensor values.
Outputs (a few MB in all):

    tiny-wan/                 a complete WanPipeline folder written by save_pretrained
    transformer.safetensors   WanTransformer3DModel forward, batch 2, with per-stage intermediates
    vae.safetensors           AutoencoderKLWan encode (posterior mean) and decode, batch 2, 9 frames
    umt5.safetensors          token ids, masks, UMT5 last hidden state, zero-padded prompt embeddings
    schedulers.safetensors    UniPC / FlowMatchEuler timesteps, sigmas and trajectories
    pipeline_unipc.safetensors, pipeline_euler.safetensors
                              full 3-step WanPipeline runs with CFG from given latents
    v2v_input/                a 5-frame 48x64 clip as PNG frames (the video-to-video input)
    v2v_unipc.safetensors, v2v_euler.safetensors
                              WanVideoToVideoPipeline runs (strength 0.6 of 5 steps, CFG) with the
                              noise diffusers mixed into the encoded clip
    i2v/                      the image-to-video parts: image_encoder/ (CLIPVisionModel),
                              image_processor/, transformer/ (36 input channels, image_dim,
                              added_kv_proj_dim), transformer_flf2v/ (the same with pos_embed_seq_len,
                              for first-last-frame), first.png, last.png (48x64); the VAE, text
                              encoder, tokenizer and scheduler are tiny-wan's
    i2v_unipc.safetensors, flf2v_unipc.safetensors, ti2v_unipc.safetensors
                              WanImageToVideoPipeline runs (3 steps, CFG, from init_latents): Wan 2.1
                              I2V, first-last-frame, and Wan 2.2 TI2V (expand_timesteps) on tiny-wan's
                              transformer, each with the CLIP image states it used
    manifest.json             versions and the exact inputs of each record
"""

import json
import os
import sys

import diffusers
import numpy as np
import tokenizers
import torch
import transformers
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
    WanImageToVideoPipeline,
    WanVideoToVideoPipeline,
)
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedTokenizerFast,
    UMT5Config,
    UMT5EncoderModel,
)

torch.set_num_threads(2)
OUT = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures"
os.makedirs(OUT, exist_ok=True)
manifest = {
    "torch": torch.__version__,
    "diffusers": diffusers.__version__,
    "transformers": transformers.__version__,
    "tokenizers": tokenizers.__version__,
}

PROMPT = "a cat dancing in a red field"
NEGATIVE = "blurry low quality"
MAX_SEQ = 32


def save(name, tensors):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, os.path.join(OUT, name))


def perturb_norms(module, generator):
    """Default init leaves norm gains at 1 and some biases at 0; randomise them so a missing one shows."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.split(".")[-1]
            if leaf == "gamma" or (p.ndim == 1 and leaf == "weight"):
                p.mul_(0.8 + 0.4 * torch.rand(p.shape, generator=generator))
            elif leaf == "bias":
                p.add_(0.1 * (torch.rand(p.shape, generator=generator) - 0.5))


gen = torch.Generator().manual_seed(0)

# ---- tokenizer: a small Unigram model in the umT5 style (Metaspace, EOS appended, pad 0) ----
corpus = [
    PROMPT,
    NEGATIVE,
    "a dog running on a green hill",
    "the quick brown fox jumps over the lazy dog",
    "a red circle moving left",
    "a blue square moving up on a black background",
    "low quality blurry video of a field",
] * 4
tok = Tokenizer(models.Unigram())
tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
tok.train_from_iterator(
    corpus,
    trainers.UnigramTrainer(vocab_size=64, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"),
)
tok.post_processor = processors.TemplateProcessing(
    single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
)
tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
tokenizer.model_max_length = 512

# ---- models ----
torch.manual_seed(0)
text_encoder = UMT5EncoderModel(
    UMT5Config(
        vocab_size=tok.get_vocab_size(),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        pad_token_id=0,
        eos_token_id=1,
    )
).eval()
perturb_norms(text_encoder, gen)

TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=32,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=128,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
torch.manual_seed(1)
transformer = WanTransformer3DModel(**TINY_TRANSFORMER).eval()
perturb_norms(transformer, gen)

torch.manual_seed(2)
vae = AutoencoderKLWan(
    base_dim=8,
    z_dim=16,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
).eval()
perturb_norms(vae, gen)

scheduler = UniPCMultistepScheduler(
    prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
)

pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler)
folder = os.path.join(OUT, "tiny-wan")
pipe.save_pretrained(folder, safe_serialization=True)
# Run everything below from the saved folder, so the fixtures describe exactly what is on disk.
pipe = WanPipeline.from_pretrained(folder, dtype=torch.float32)
transformer, vae, text_encoder, tokenizer = pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer

# ---- transformer forward with intermediates ----
records = {}


def hook(name):
    def fn(_module, _inputs, output):
        if isinstance(output, tuple):
            for i, o in enumerate(output):
                if isinstance(o, torch.Tensor):
                    records[f"{name}.{i}"] = o
        else:
            records[name] = output

    return fn


handles = [transformer.rope.register_forward_hook(hook("rope"))]
for name in ["patch_embedding", "condition_embedder", "norm_out", "proj_out"]:
    handles.append(getattr(transformer, name).register_forward_hook(hook(name)))
for i, block in enumerate(transformer.blocks):
    handles.append(block.register_forward_hook(hook(f"blocks.{i}")))
for name in ["norm1", "attn1", "norm2", "attn2", "norm3", "ffn"]:
    handles.append(getattr(transformer.blocks[0], name).register_forward_hook(hook(f"blocks.0.{name}")))

g = torch.Generator().manual_seed(10)
hidden = torch.randn(2, 16, 3, 6, 8, generator=g)  # 3 latent frames, 48x64 px: non-square
timestep = torch.tensor([757.0, 120.5])
context = torch.randn(2, 8, 32, generator=g)
context[1, 5:] = 0.0  # sample 1 has 5 real tokens, zero padding after
with torch.no_grad():
    out = transformer(hidden_states=hidden, timestep=timestep, encoder_hidden_states=context, return_dict=False)[0]
for h in handles:
    h.remove()
records.update({"input.hidden_states": hidden, "input.timestep": timestep, "input.encoder_hidden_states": context})
records["output"] = out
save("transformer.safetensors", records)
manifest["transformer"] = sorted(records)

# ---- VAE: encode (posterior mean) and decode, batch 2, 9 frames (3 latent frames) ----
g = torch.Generator().manual_seed(11)
video = torch.rand(2, 3, 9, 32, 48, generator=g) * 2 - 1
with torch.no_grad():
    posterior = vae.encode(video).latent_dist
    decoded = vae.decode(posterior.mean, return_dict=False)[0]
    image = video[:, :, :1]
    image_mean = vae.encode(image).latent_dist.mean
    image_decoded = vae.decode(image_mean, return_dict=False)[0]
save(
    "vae.safetensors",
    {
        "video": video,
        "posterior_mean": posterior.mean,
        "posterior_logvar": posterior.logvar,
        "decoded": decoded,
        "image": image,
        "image_mean": image_mean,
        "image_decoded": image_decoded,
    },
)

# ---- text encoder ----
prompts = [PROMPT, NEGATIVE]
enc = tokenizer(
    prompts,
    padding="max_length",
    max_length=MAX_SEQ,
    truncation=True,
    add_special_tokens=True,
    return_attention_mask=True,
    return_tensors="pt",
)
with torch.no_grad():
    hidden_text = text_encoder(enc.input_ids, enc.attention_mask).last_hidden_state
    prompt_embeds, negative_embeds = pipe.encode_prompt(
        prompt=PROMPT, negative_prompt=NEGATIVE, do_classifier_free_guidance=True, max_sequence_length=MAX_SEQ
    )
save(
    "umt5.safetensors",
    {
        "input_ids": enc.input_ids,
        "attention_mask": enc.attention_mask,
        "last_hidden_state": hidden_text,
        "prompt_embeds": prompt_embeds,
        "negative_prompt_embeds": negative_embeds,
    },
)
manifest["umt5"] = {"prompts": prompts, "max_sequence_length": MAX_SEQ}

# ---- schedulers: timesteps, sigmas, trajectories from fixed model outputs ----
sched = {}
g = torch.Generator().manual_seed(12)
sample0 = torch.randn(1, 16, 2, 4, 4, generator=g)
outputs = torch.randn(6, 1, 16, 2, 4, 4, generator=g)
for kind in ["unipc", "euler"]:
    for shift in [3.0, 5.0]:
        for steps in [3, 4, 6, 10, 50]:
            if kind == "unipc":
                s = UniPCMultistepScheduler(
                    prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, num_train_timesteps=1000
                )
            else:
                s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
            s.set_timesteps(steps)
            key = f"{kind}.shift{shift:g}.steps{steps}"
            sched[f"{key}.timesteps"] = s.timesteps.clone()
            sched[f"{key}.sigmas"] = s.sigmas.clone()
            if steps == 6:
                x = sample0.clone()
                for i, t in enumerate(s.timesteps):
                    x = s.step(outputs[i], t, x, return_dict=False)[0]
                    sched[f"{key}.trajectory.{i}"] = x.clone()
# DDPM (ancestral, with recorded noise) and DDIM (eta 0), epsilon prediction, latent-space configs.
import diffusers.schedulers.scheduling_ddpm as ddpm_module
from diffusers import DDIMScheduler, DDPMScheduler

variance_noise = torch.randn(6, 1, 16, 2, 4, 4, generator=g)
for kind, cls in [("ddpm", DDPMScheduler), ("ddim", DDIMScheduler)]:
    for steps in [6, 50]:
        s = cls(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, prediction_type="epsilon")
        s.set_timesteps(steps)
        key = f"{kind}.steps{steps}"
        sched[f"{key}.timesteps"] = s.timesteps.clone()
        if steps == 6:
            draws = iter(variance_noise)
            original = ddpm_module.randn_tensor
            ddpm_module.randn_tensor = lambda *a, **k: next(draws).clone()
            x = sample0.clone()
            for i, t in enumerate(s.timesteps):
                x = s.step(outputs[i], t, x, return_dict=False)[0]
                sched[f"{key}.trajectory.{i}"] = x.clone()
            ddpm_module.randn_tensor = original
sched["ddpm.variance_noise"] = variance_noise
sched["trajectory.sample"] = sample0
sched["trajectory.model_outputs"] = outputs
save("schedulers.safetensors", sched)


def run_recording_steps(pipeline, **kwargs):
    """Runs a pipeline; returns its frames (1, F, H, W, 3) and the records of every step:
    the timesteps and the latents after each step."""
    steps = []

    def on_step(_pipe, i, t, step_kwargs):
        steps.append((t.clone(), step_kwargs["latents"].clone()))
        return step_kwargs

    with torch.no_grad():
        result = pipeline(**kwargs, output_type="np", callback_on_step_end=on_step)
    rec = {"frames": torch.from_numpy(result.frames), "timesteps": torch.stack([t for t, _ in steps])}
    for i, (_, lat) in enumerate(steps):
        rec[f"step.{i}.latents"] = lat
    return rec


# ---- full pipeline runs with CFG from given latents ----
g = torch.Generator().manual_seed(13)
latents = torch.randn(1, 16, 2, 6, 8, generator=g)  # 5 frames, 48x64 px
save("init_latents.safetensors", {"latents": latents})
run = dict(
    prompt=PROMPT,
    negative_prompt=NEGATIVE,
    height=48,
    width=64,
    num_frames=5,
    num_inference_steps=3,
    guidance_scale=5.0,
    max_sequence_length=MAX_SEQ,
)
manifest["pipeline"] = run
for kind, sch in [
    ("unipc", pipe.scheduler),
    ("euler", FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)),
]:
    pipe.scheduler = sch
    rec = run_recording_steps(pipe, **run, latents=latents.clone())
    rec["latents"] = latents
    save(f"pipeline_{kind}.safetensors", rec)

# ---- video-to-video (SDEdit) from a PNG-frame clip ----
g = torch.Generator().manual_seed(17)
# A smooth random clip: low-resolution noise upsampled, drifting over the frames.
base = torch.rand(3, 7, 9, generator=g)
clip_dir = os.path.join(OUT, "v2v_input")
os.makedirs(clip_dir, exist_ok=True)
clip = []
for i in range(5):
    frame = torch.nn.functional.interpolate(base.roll(i, dims=2)[None], size=(48, 64), mode="bilinear")[0]
    img = Image.fromarray((frame.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    img.save(os.path.join(clip_dir, f"frame_{i:03d}.png"))
    clip.append(Image.open(os.path.join(clip_dir, f"frame_{i:03d}.png")).convert("RGB"))
v2v = WanVideoToVideoPipeline(
    tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=pipe.scheduler
)
v2v_run = dict(
    prompt=PROMPT,
    negative_prompt=NEGATIVE,
    height=48,
    width=64,
    num_inference_steps=5,
    strength=0.6,
    guidance_scale=5.0,
    max_sequence_length=MAX_SEQ,
)
manifest["video_to_video"] = v2v_run
for kind, sch in [
    ("unipc", UniPCMultistepScheduler.from_pretrained(folder, subfolder="scheduler")),
    ("euler", FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)),
]:
    v2v.scheduler = sch
    mixed = {}
    # Record exactly what the pipeline mixes: the encoded clip, the noise, the timestep.
    name = "add_noise" if hasattr(sch, "add_noise") else "scale_noise"
    original = getattr(sch, name)

    def spy(*args, _original=original, _name=name, **kwargs):
        if _name == "add_noise":
            sample, noise, t = args
        else:
            sample, t, noise = args
        mixed.update(clean=sample.clone(), noise=noise.clone(), timestep=t.clone())
        return _original(*args, **kwargs)

    setattr(sch, name, spy)
    rec = run_recording_steps(v2v, **v2v_run, video=clip, generator=torch.Generator().manual_seed(23))
    rec.update(
        clean_latents=mixed["clean"],
        noise=mixed["noise"],
        first_timestep=mixed["timestep"].float(),
        timesteps=rec["timesteps"].float(),
    )
    save(f"v2v_{kind}.safetensors", rec)

# ---- image-to-video: Wan 2.1 I2V, first-last-frame (FLF2V) and Wan 2.2 TI2V ----
i2v_dir = os.path.join(OUT, "i2v")
torch.manual_seed(3)
# hidden_states[-2] of a 3-layer encoder is layer 2's output; 48x48 crops in 16x16 patches: 10 tokens.
image_encoder = CLIPVisionModel(
    CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=48,
        patch_size=16,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=16,
    )
).eval()
perturb_norms(image_encoder, gen)
with torch.no_grad():
    image_encoder.embeddings.class_embedding.normal_(generator=gen)
image_encoder.save_pretrained(os.path.join(i2v_dir, "image_encoder"), safe_serialization=True)
# Images come at the clip's size (48x64), so the shortest-edge resize is the identity and the
# processor only centre-crops (to 48x48), rescales and normalises.
image_processor = CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
image_processor.save_pretrained(os.path.join(i2v_dir, "image_processor"))
i2v_transformers = {}
for name, pos_embed in [("transformer", None), ("transformer_flf2v", 20)]:
    torch.manual_seed(4)
    # 16 noisy latent channels + 4 mask + 16 of the encoded condition clip.
    i2v_config = dict(TINY_TRANSFORMER, in_channels=36, image_dim=32, added_kv_proj_dim=64)
    t = WanTransformer3DModel(**i2v_config, pos_embed_seq_len=pos_embed).eval()
    perturb_norms(t, gen)
    if pos_embed is not None:
        with torch.no_grad():
            t.condition_embedder.image_embedder.pos_embed.normal_(generator=gen)
    t.save_pretrained(os.path.join(i2v_dir, name), safe_serialization=True)
    i2v_transformers[name] = WanTransformer3DModel.from_pretrained(os.path.join(i2v_dir, name))
image_encoder = CLIPVisionModel.from_pretrained(os.path.join(i2v_dir, "image_encoder")).eval()
image_processor = CLIPImageProcessor.from_pretrained(os.path.join(i2v_dir, "image_processor"))

g = torch.Generator().manual_seed(19)
for name in ["first", "last"]:
    pixels = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8, generator=g), size=(48, 64), mode="bilinear")[0]
    Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
        os.path.join(i2v_dir, f"{name}.png")
    )
first = Image.open(os.path.join(i2v_dir, "first.png")).convert("RGB")
last = Image.open(os.path.join(i2v_dir, "last.png")).convert("RGB")
# diffusers' attention splits the image tokens off as all but the last 512 context tokens.
i2v_run = dict(run, max_sequence_length=512)
manifest["image_to_video"] = i2v_run
for record, transformer_name, extra in [
    ("i2v", "transformer", {}),
    ("flf2v", "transformer_flf2v", {"last_image": last}),
    ("ti2v", None, {}),
]:
    i2v = WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=UniPCMultistepScheduler.from_pretrained(folder, subfolder="scheduler"),
        transformer=i2v_transformers[transformer_name] if transformer_name else transformer,
        image_processor=image_processor if transformer_name else None,
        image_encoder=image_encoder if transformer_name else None,
        expand_timesteps=transformer_name is None,
    )
    rec = run_recording_steps(i2v, **i2v_run, **extra, image=first, latents=latents.clone())
    if transformer_name:
        with torch.no_grad():
            rec["image_embeds"] = i2v.encode_image([first, last] if extra else first, "cpu")
    rec["timesteps"] = rec["timesteps"].float()
    save(f"{record}_unipc.safetensors", rec)

with open(os.path.join(OUT, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
print("fixtures written to", OUT)
