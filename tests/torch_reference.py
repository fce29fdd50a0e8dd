"""Independent PyTorch references: diffusers' AutoencoderKL with random weights, saved as a
diffusers folder or as an LDM-key safetensors file built by diffusers' own LDM conversion."""

from __future__ import annotations

import pathlib

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.numpy import save_file


def make_torch_vae(
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,  # LDM files do not record it; 32 is what every real VAE uses
    quant_convs=True,
    seed=0,
    weight_std: float | None = 0.15,
) -> AutoencoderKL:
    """A diffusers AutoencoderKL with every parameter random (GroupNorm affine included), so
    that no transposition or naming mistake can hide behind ones and zeros.
    `weight_std=None` keeps diffusers' own init for weights (deep, full-size models)."""
    torch.manual_seed(seed)
    n = len(block_out_channels)
    vae = AutoencoderKL(
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        use_quant_conv=quant_convs,
        use_post_quant_conv=quant_convs,
    ).eval()
    with torch.no_grad():
        for name, param in vae.named_parameters():
            is_norm = "norm" in name
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif is_norm:
                param.normal_(1.0, 0.1)
            elif weight_std is not None:
                param.normal_(0.0, weight_std)
    return vae


def ldm_shapes(ch, ch_mult, num_res_blocks, z, quant, in_ch=3, out_ch=3) -> dict[str, tuple]:
    """Every key of an LDM/CompVis AutoencoderKL state dict -> its torch shape."""
    shapes: dict[str, tuple] = {}

    def conv(name, c_in, c_out, k):
        shapes[f"{name}.weight"] = (c_out, c_in, k, k)
        shapes[f"{name}.bias"] = (c_out,)

    def norm(name, c):
        shapes[f"{name}.weight"] = (c,)
        shapes[f"{name}.bias"] = (c,)

    def resnet(name, c_in, c_out):
        norm(f"{name}.norm1", c_in)
        conv(f"{name}.conv1", c_in, c_out, 3)
        norm(f"{name}.norm2", c_out)
        conv(f"{name}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{name}.nin_shortcut", c_in, c_out, 1)

    def mid(name, c):
        resnet(f"{name}.block_1", c, c)
        norm(f"{name}.attn_1.norm", c)
        for layer in ("q", "k", "v", "proj_out"):
            conv(f"{name}.attn_1.{layer}", c, c, 1)  # 1x1 convs in LDM files
        resnet(f"{name}.block_2", c, c)

    widths = [ch * m for m in ch_mult]
    conv("encoder.conv_in", in_ch, ch, 3)
    c = ch
    for i, width in enumerate(widths):
        for j in range(num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", c, width)
            c = width
        if i < len(widths) - 1:
            conv(f"encoder.down.{i}.downsample.conv", c, c, 3)
    mid("encoder.mid", c)
    norm("encoder.norm_out", c)
    conv("encoder.conv_out", c, 2 * z, 3)
    conv("decoder.conv_in", z, widths[-1], 3)
    mid("decoder.mid", widths[-1])
    c = widths[-1]
    for i in reversed(range(len(widths))):  # decoder.up.0 is the full-resolution level
        for j in range(num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", c, widths[i])
            c = widths[i]
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", c)
    conv("decoder.conv_out", c, out_ch, 3)
    if quant:
        conv("quant_conv", 2 * z, 2 * z, 1)
        conv("post_quant_conv", z, z, 1)
    return shapes


def random_ldm_state_dict(vae: AutoencoderKL, seed=1) -> dict[str, np.ndarray]:
    """Random LDM-key weights for `vae`'s architecture, loaded INTO `vae` through diffusers'
    own LDM -> diffusers conversion (strict), so both sides hold the same numbers."""
    cfg = vae.config
    chans = cfg.block_out_channels
    shapes = ldm_shapes(
        chans[0],
        tuple(c // chans[0] for c in chans),
        cfg.layers_per_block,
        cfg.latent_channels,
        cfg.use_quant_conv,
        cfg.in_channels,
        cfg.out_channels,
    )
    rng = np.random.default_rng(seed)
    ldm = {}
    for key, shape in shapes.items():
        centre = 1.0 if ("norm" in key and key.endswith("weight")) else 0.0
        std = 0.1 if (key.endswith("bias") or "norm" in key) else 0.15
        ldm[key] = rng.normal(centre, std, shape).astype(np.float32)
    converted = convert_ldm_vae_checkpoint({k: torch.from_numpy(v) for k, v in ldm.items()}, dict(vae.config))
    vae.load_state_dict(converted, strict=True)
    return ldm


def save_ldm(ldm: dict[str, np.ndarray], path: pathlib.Path) -> pathlib.Path:
    save_file(ldm, str(path))
    return path


def torch_encode_decode(vae: AutoencoderKL, x_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' posterior mode and its decoding, returned NHWC."""
    with torch.no_grad():
        z = vae.encode(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2))).latent_dist.mode()
        x_hat = vae.decode(z).sample
    return z.numpy().transpose(0, 2, 3, 1), x_hat.numpy().transpose(0, 2, 3, 1)
