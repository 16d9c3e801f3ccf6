"""Train the toy-world base model from scratch: VAE, CLIP text encoder and U-Net.

    .venv/bin/python scripts/train_toy_base.py --phases vae,decoder,classifier --threads 1
    .venv/bin/python scripts/train_toy_base.py --phases base --threads 2 --out sdtune/toy/base

The result is a real diffusers Stable Diffusion 1 folder (fp16 safetensors, the real CLIP
tokenizer, a DDIM scheduler on the SD 1 noise schedule) that `StableDiffusionPipeline.from_pretrained`
loads. It is trained only on circles, squares and triangles; rings and stars are held out for a
LoRA to teach. DDIM, not SD 1's PNDM, because this small model's PNDM samples at guidance 7.5 fall apart
(measured in the model card).

Phases, all seeded (same flags and thread count -> same weights), run in this order:
1. vae: the VAE (3 downsamplings like real SD: 64 px -> 8x8x4 latents) on reconstruction plus a
   small KL term; its scaling factor is set from the measured latent std, as SD's was;
2. decoder: its decoder trained longer on the frozen encoder's latents (as SD's ft-MSE decoder);
3. classifier: the shape/colour judge (`sdtune.toy.measure`), on renders and their round trips
   through that VAE, saved next to the toy package;
4. base: the text encoder and U-Net together from scratch, eps-prediction on the SD 1 noise
   schedule with min-SNR weighting, 10% empty captions so classifier-free guidance works, and
   an EMA of both (the EMA is what ships). A checkpoint folder is written every
   `--every-n-steps`, each one a usable base.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from torch.nn import functional as F
from transformers import CLIPTextConfig, CLIPTextModel

from sdtune.data.synthetic import Pose
from sdtune.models.tokenizer import CONFIGS_DIR, load_tokenizer, write_tokenizer_folder
from sdtune.toy.measure import (
    CLASSIFIER_PATH,
    JUDGE_POSE,
    classifier_accuracy,
    save_classifier,
    to_tensor,
    train_classifier,
)
from sdtune.toy.world import (
    HELD_IN_SHAPES,
    HELD_OUT_SHAPE,
    TOY_POSE,
    render_scenes,
    sample_scenes,
)
from sdtune.train.objectives import compute_min_snr_weights

# The VAE learns every pose (anywhere, any turn), as the classifier does; the diffusion model
# learns the toy world's narrower poses (`sdtune.toy.world.TOY_POSE`).
VAE_POSE = JUDGE_POSE
# The real SD 1 scheduler config (PNDM, scaled-linear betas 0.00085..0.012, eps prediction).
SCHEDULER_CONFIG = json.loads(
    (CONFIGS_DIR / "sd1" / "scheduler" / "scheduler_config.json").read_text()
)


def build_vae(channels: list[int]) -> AutoencoderKL:
    """SD's VAE layout at tiny widths; one downsampling per block after the first. Few norm
    groups: with one or two channels per group, group norm erases the flat colours these scenes
    are made of."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(channels),
        up_block_types=["UpDecoderBlock2D"] * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )


def build_text_encoder(width: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=width,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    return CLIPTextModel(config)


def build_unet(width: int, channels: list[int], latent_size: int) -> UNet2DConditionModel:
    blocks = len(channels)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=["CrossAttnDownBlock2D"] * (blocks - 1) + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (blocks - 1),
        block_out_channels=channels,
        layers_per_block=1,
        cross_attention_dim=width,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def render_set(
    count: int, rng: random.Random, pose: Pose = TOY_POSE
) -> tuple[torch.Tensor, list[str]]:
    scenes = sample_scenes(count, HELD_IN_SHAPES, rng)
    return to_tensor(render_scenes(scenes, rng, pose=pose)), [s.caption() for s in scenes]


def one_cycle_adamw(params, total_steps: int):
    """AdamW with a one-cycle schedule to 1e-3: how the VAE and its decoder are trained."""
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=1e-3, total_steps=total_steps, pct_start=0.1
    )
    return opt, sched


def optimizer_step(loss: torch.Tensor, params, opt, sched) -> None:
    """Backward, clip the gradient norm to 1, step the optimizer and its schedule."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def train_vae(args: argparse.Namespace, log) -> AutoencoderKL:
    rng = random.Random(args.seed + 1)
    images, _ = render_set(args.vae_images, rng, VAE_POSE)
    torch.manual_seed(args.seed + 1)  # each phase seeds itself: phases can run separately
    vae = build_vae(args.vae_channels)
    opt, sched = one_cycle_adamw(vae.parameters(), args.vae_steps)
    gen = torch.Generator().manual_seed(args.seed + 1)
    start = time.time()
    for step in range(1, args.vae_steps + 1):
        x = images[torch.randint(0, len(images), (args.vae_batch_size,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        kl = posterior.kl().mean() / z[0].numel()
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + args.kl_weight * kl
        optimizer_step(loss, vae.parameters(), opt, sched)
        if step % 25 == 0 or step == args.vae_steps:
            log(
                f"vae step {step} loss {loss.item():.4f} kl {kl.item():.3f} {time.time() - start:.0f}s"
            )
    return vae.eval()


@torch.no_grad()
def set_scaling_factor(vae: AutoencoderKL, seed: int, log) -> float:
    """1 / std of sampled latents, so the diffusion model sees unit-variance inputs (as in SD)."""
    images, _ = render_set(512, random.Random(seed + 2), VAE_POSE)
    latents = torch.cat(
        [vae.encode(images[i : i + 128]).latent_dist.sample() for i in range(0, 512, 128)]
    )
    factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=round(factor, 5))
    held_out = to_tensor(
        render_scenes(
            sample_scenes(128, (HELD_OUT_SHAPE,), random.Random(seed)),
            random.Random(seed),
            pose=VAE_POSE,
        )
    )
    held_in_err = F.mse_loss(
        vae.decode(vae.encode(images[:128]).latent_dist.mean).sample, images[:128]
    )
    held_out_err = F.mse_loss(vae.decode(vae.encode(held_out).latent_dist.mean).sample, held_out)
    log(
        f"vae scaling factor {factor:.5f}; reconstruction mse held-in {held_in_err:.4f},"
        f" {HELD_OUT_SHAPE}s {held_out_err:.4f}"
    )
    return factor


@torch.no_grad()
def save_reconstructions(vae: AutoencoderKL, images: torch.Tensor, path: Path) -> None:
    """Originals above, reconstructions below: a quick look at what the VAE keeps."""
    from PIL import Image

    recon = vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
    rows = [torch.cat(list(t), dim=2) for t in (images, recon)]  # (3, 64, 64 * n) each
    grid = ((torch.cat(rows, dim=1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(grid).save(path)


@torch.no_grad()
def encode_set(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), 256):
        dist = vae.encode(images[i : i + 256]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def save_base(folder: Path, vae, text_encoder, unet, tokenizer) -> None:
    """A diffusers SD 1 folder, fp16 weights, written to a temporary name and renamed in."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).half(),
        text_encoder=copy.deepcopy(text_encoder).half(),
        tokenizer=tokenizer,
        unet=copy.deepcopy(unet).half(),
        scheduler=DDIMScheduler.from_config(SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(tmp / "tokenizer")  # the slow-tokenizer files real SD 1 folders ship (1.5 MB)
    write_tokenizer_folder(tmp / "tokenizer", sd_version=1)
    # fp16 on disk, fp32 when loaded: transformers would otherwise keep the text encoder in
    # fp16 while diffusers upcasts the rest, and a plain from_pretrained would mix dtypes.
    config_file = tmp / "text_encoder" / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = "float32"
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def lr_factor(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up over 200 steps, then a cosine decay to 0 (or constant, --constant-lr)."""
    if step < 200:
        return (step + 1) / 200
    if not args.cosine:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - 200) / max(1, args.steps - 200))))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1 - decay)


def train_diffusion(args, vae, tokenizer, log) -> None:
    rng = random.Random(args.seed + 3)
    images, captions = render_set(args.images, rng)
    means, stds = encode_set(vae, images)
    factor = vae.config.scaling_factor
    vocab = sorted(set(captions)) + [""]
    ids_of = {
        c: tokenizer(
            c, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids[0]
        for c in vocab
    }
    caption_ids = torch.stack([ids_of[c] for c in captions])
    empty_ids = ids_of[""]
    log(
        f"{len(images)} training scenes, {len(vocab) - 1} distinct captions, latents {tuple(means.shape[1:])}"
    )

    torch.manual_seed(args.seed)
    text_encoder = build_text_encoder(args.text_width)
    unet = build_unet(args.text_width, args.unet_channels, means.shape[-1])
    log(
        f"parameters: unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, text encoder {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M, vae {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M"
    )
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, fused=True)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args))
    noise_sched = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    gen = torch.Generator().manual_seed(args.seed + 4)
    start, losses = time.time(), []
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(images), (args.batch_size,), generator=gen)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * factor
        ids = caption_ids[idx].clone()
        drop = torch.rand(args.batch_size, generator=gen) < args.empty_caption_rate
        ids[drop] = empty_ids
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, 1000, (args.batch_size,), generator=gen)
        noisy = noise_sched.add_noise(latents, noise, t)
        context = text_encoder(ids)[0]
        loss = F.mse_loss(unet(noisy, t, context).sample, noise, reduction="none")
        loss = loss.mean(dim=(1, 2, 3))  # one per sample
        if args.min_snr_gamma:  # the nearly clean timesteps stop dominating the loss
            loss = loss * compute_min_snr_weights(
                t, noise_sched.alphas_cumprod, args.min_snr_gamma, "epsilon"
            )
        loss = loss.mean()
        optimizer_step(loss, params, opt, warmup)
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        update_ema(ema_unet, unet, decay)
        update_ema(ema_text, text_encoder, decay)
        losses.append(loss.item())
        if step % 50 == 0:
            log(f"step {step} loss {np.mean(losses[-50:]):.4f} {time.time() - start:.0f}s")
        if step % args.every_n_steps == 0 or step == args.steps:
            folder = args.work / f"checkpoint-{step}"
            save_base(folder, vae, ema_text, ema_unet, tokenizer)
            log(f"saved {folder}")


def save_vae(vae: AutoencoderKL, folder: Path) -> None:
    """fp16 on disk, as it ships; the next phase loads it back as fp32."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    copy.deepcopy(vae).half().save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def load_vae(folder: Path) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval()


def finetune_decoder(args: argparse.Namespace, log) -> AutoencoderKL:
    """Train the VAE decoder longer on the frozen encoder's latents, as SD's ft-MSE decoder was.

    The latents do not change, so a U-Net trained on them stays valid; only the pictures
    decoded from them get sharper and truer in colour.
    """
    vae = load_vae(args.work / "vae-raw")
    vae.requires_grad_(False)
    trainable = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in trainable:
        p.requires_grad_(True)
    images, _ = render_set(args.vae_images, random.Random(args.seed + 6), VAE_POSE)
    opt, sched = one_cycle_adamw(trainable, args.decoder_steps)
    gen = torch.Generator().manual_seed(args.seed + 6)
    start = time.time()
    for step in range(1, args.decoder_steps + 1):
        x = images[torch.randint(0, len(images), (args.vae_batch_size,), generator=gen)]
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        optimizer_step(loss, trainable, opt, sched)
        if step % 25 == 0 or step == args.decoder_steps:
            log(f"decoder step {step} loss {loss.item():.4f} {time.time() - start:.0f}s")
    vae.eval()
    previews, _ = render_set(8, random.Random(args.seed + 5))
    save_reconstructions(vae, previews, args.work / "decoder-reconstructions.png")
    return vae


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=Path("sdtune/toy/base"), help="final model folder"
    )
    parser.add_argument(
        "--work", type=Path, default=Path("/tmp/toy-base-work"), help="checkpoints and log"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (part of the result's identity)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--classifier-steps", type=int, default=600)
    parser.add_argument(
        "--vae-channels",
        type=int,
        nargs="+",
        default=[16, 32, 64, 64],
        help="VAE block widths; one downsampling per block after the first (4 blocks: 8x8 latents)",
    )
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--vae-batch-size", type=int, default=16)
    parser.add_argument("--vae-images", type=int, default=8000)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--images", type=int, default=12000, help="rendered scenes for the U-Net")
    parser.add_argument("--steps", type=int, default=3000, help="U-Net + text encoder steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--min-snr-gamma", type=float, default=5.0, help="loss weighting; 0 = plain MSE"
    )
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--empty-caption-rate", type=float, default=0.1)
    parser.add_argument("--text-width", type=int, default=64)
    parser.add_argument("--unet-channels", type=int, nargs="+", default=[64, 128, 128])
    parser.add_argument("--every-n-steps", type=int, default=500)
    parser.add_argument(
        "--phases",
        default="vae,decoder,classifier,base",
        help="comma-separated, run in this order: vae (WORK/vae-raw), decoder (fine-tune its "
        "decoder: WORK/vae), classifier (sdtune/toy/classifier.safetensors), base (text encoder "
        "and U-Net on the VAE's latents; checkpoints in WORK, the last one copied to --out)",
    )
    parser.add_argument(
        "--no-classifier-round-trips",
        dest="classifier_round_trips",
        action="store_false",
        help="train the classifier on renders only (default: also on their VAE round trips)",
    )
    parser.add_argument(
        "--vae-from", type=Path, default=None, help="the VAE folder to use (default: WORK/vae)"
    )
    parser.add_argument(
        "--constant-lr",
        dest="cosine",
        action="store_false",
        help="keep the learning rate after warm-up (default: cosine decay to 0 over --steps)",
    )
    parser.add_argument("--decoder-steps", type=int, default=1000)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    log_file = (args.work / "train.log").open("a", encoding="utf-8")

    def log(message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {message}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    log(f"arguments: {json.dumps({k: str(v) for k, v in vars(args).items()})}")
    phases = set(args.phases.split(","))
    if "vae" in phases:
        vae = train_vae(args, log)
        set_scaling_factor(vae, args.seed, log)
        previews, _ = render_set(8, random.Random(args.seed + 5))
        save_reconstructions(vae, previews, args.work / "vae-reconstructions.png")
        save_vae(vae, args.work / "vae-raw")
        log(f"saved {args.work / 'vae-raw'}")
    if "decoder" in phases:
        save_vae(finetune_decoder(args, log), args.work / "vae")
        log(f"saved {args.work / 'vae'} (decoder fine-tuned; same encoder, same latents)")
    vae_folder = args.vae_from or args.work / "vae"
    if "classifier" in phases:
        vae = load_vae(vae_folder) if args.classifier_round_trips else None
        net = train_classifier(steps=args.classifier_steps, seed=args.seed, vae=vae)
        save_classifier(net, CLASSIFIER_PATH)
        log(f"classifier accuracy on fresh renders: {classifier_accuracy(net)}")
        if vae is not None:
            log(
                f"... on their round trips through {vae_folder}: {classifier_accuracy(net, vae=vae)}"
            )
    if "base" not in phases:
        return
    train_diffusion(args, load_vae(vae_folder), load_tokenizer(1), log)
    final = args.work / f"checkpoint-{args.steps}"
    shutil.rmtree(args.out, ignore_errors=True)
    shutil.copytree(final, args.out)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
