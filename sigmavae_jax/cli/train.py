"""Train or fine-tune a Sigma-VAE: `sigmavae-train --config configs/X.yaml [key=value ...]`
(or `python train.py ...` in a checkout).

A thin shell over `sigmavae_jax.train.loop.train`; --help lists every config key.
"""

from __future__ import annotations

import argparse
import sys

from sigmavae_jax import logs, topology
from sigmavae_jax.cli import dry_run, shared_args
from sigmavae_jax.config import ConfigError, describe_keys, load_config

EXAMPLES = """\
examples:
  # the CPU-sized demo model on a folder of images
  python train.py --config configs/tiny.yaml data.path=photos/ workdir=runs/tiny

  # the NextStep-1 recipe (decoder-only, L2 + LPIPS) from converted weights, on ImageNet via tfds
  python train.py --config configs/nextstep1_f8c16.yaml --init out/nextstep1 \\
      data.source=tfds data.name=imagenet2012 data.dir=/data/tfds workdir=runs/ns1

  # the same, straight from the Hugging Face Hub (fetched and converted once, then cached)
  python train.py --config configs/nextstep1_f8c16.yaml --init stepfun-ai/NextStep-1-f8ch16-Tokenizer \\
      data.source=tfds data.name=imagenet2012 data.dir=/data/tfds workdir=runs/ns1

  # a TPU VM pod slice: the same command on every host, plus --multihost; the workdir in a
  # bucket every host reaches, the tfds data on a gcsfuse mount or a persistent disk
  python train.py --config configs/sd.yaml --multihost data.source=tfds data.name=imagenet2012 \\
      data.dir=/mnt/tfds workdir=gs://BUCKET/runs/sd

  # before renting a slice: compile the exact step for it here and see HBM, FLOPs, images/s
  python train.py --config configs/nextstep1_f8c16.yaml --dry-run --topology v5litepod-16 \\
      train.compute_dtype=bfloat16 train.batch_size=128 --find-batch

Run the same command again to resume from the latest checkpoint in workdir (local or gs://).
On SIGTERM (a preemption notice) every process saves the same step and exits 0.

config keys (override any as key=value):
"""


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Train a Sigma-VAE (AutoencoderKL + LPIPS + PatchGAN) with JAX.",
        epilog=EXAMPLES + "\n".join(f"  {line}" for line in describe_keys()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        required=True,
        type=shared_args.non_empty_path,
        help="a YAML file or a name in configs/ (tiny, sd, nextstep1_f8c16, ...)",
    )
    parser.add_argument(
        "--init",
        type=shared_args.non_empty_path,
        metavar="EXPORT_OR_HUB_NAME",
        help="start from a params export (convert_torch_weights.py output) or a Hugging Face Hub VAE, "
        "owner/name[/subfolder][@revision] (e.g. stabilityai/sdxl-vae), converted once and cached",
    )
    shared_args.add_multiprocess_arguments(parser)
    shared_args.add_verbose_flag(parser)
    dry_run.add_arguments(parser, "the step")
    parser.add_argument(
        "--find-batch",
        action="store_true",
        help="with --dry-run: find the largest per-chip batch that fits (compiles where the memory line "
        "through the last two meets the capacity, doubling or bisecting where it cannot)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=1000")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may sit between options
    shared_args.check_multiprocess_arguments(parser, args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logs.setup(verbose=args.verbose)
    topology.quiet_libtpu_on_a_host_without_tpu()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.dry_run or args.topology or args.find_batch or args.dump_top:
        return compile_only(args, cfg)
    from sigmavae_jax import parallel, storage
    from sigmavae_jax.train.loop import TrainingDiverged, train

    try:
        if args.multihost or args.coordinator:
            parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        init = args.init
        if init:  # a Hub name becomes its cached conversion; local and gs:// paths stay as they are
            from sigmavae_jax import hub

            init = str(hub.resolve(init))
        result = train(cfg, init=init)
    except (ConfigError, FileNotFoundError, storage.StorageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:  # the cleanup (data workers, pending checkpoint writes) has run
        print(
            f"interrupted; the same command resumes from the last checkpoint in {cfg.workdir}/checkpoints",
            file=sys.stderr,
        )
        return 130
    print(
        f"{result.reason} at step {result.step}; workdir {result.workdir}"
        + (f"; params export {result.export}" if result.export else "")
    )
    return 0


def compile_only(args, cfg) -> int:
    from sigmavae_jax.topology import UnknownTopology

    if not (args.dry_run and args.topology):
        print(
            "error: --dry-run needs --topology NAME (e.g. v5litepod-4), and --topology/--find-batch/--dump-top "
            "need --dry-run",
            file=sys.stderr,
        )
        return 2
    try:
        return dry_run.train(cfg, args.topology, find_batch=args.find_batch, dump_top=args.dump_top)
    except (ConfigError, UnknownTopology, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
