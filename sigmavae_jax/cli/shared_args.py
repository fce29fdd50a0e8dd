"""The argparse pieces train.py, eval.py and convert_torch_weights.py share: count and path
types that make a zero or negative count, or an empty path, a usage error (exit 2, naming the
flag and the value) instead of a traceback from deep inside a run or a silent default, the
multi-process launch flags, and --verbose."""

from __future__ import annotations

import argparse


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """`text` as an int >= 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """`text` as an int >= 0."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def non_empty_path(text: str) -> str:
    """`text` unless it is empty or blank: an unset shell variable (`--init "$EXPORT"`) would
    otherwise be taken as no flag at all, or as the working directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must be a path, got {text!r} (an unset shell variable?)")
    return text


def add_multiprocess_arguments(parser: argparse.ArgumentParser) -> None:
    """--multihost, or the explicit --coordinator/--num-processes/--process-id, checked by
    `check_multiprocess_arguments`."""
    parser.add_argument(
        "--multihost", action="store_true", help="call jax.distributed.initialize() (TPU pods, SLURM: auto-detected)"
    )
    parser.add_argument(
        "--coordinator", metavar="HOST:PORT", help="explicit multi-process launch: the coordinator address"
    )
    parser.add_argument("--num-processes", type=positive_int, help="explicit multi-process launch: number of processes")
    parser.add_argument(
        "--process-id", type=non_negative_int, help="explicit multi-process launch: this process's index"
    )


def check_multiprocess_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exits 2 (parser.error) when --num-processes/--process-id come without --coordinator or
    --multihost, which would otherwise run one process alone, or when the index is not below the
    count."""
    if (args.num_processes is not None or args.process_id is not None) and not (args.coordinator or args.multihost):
        parser.error("--num-processes and --process-id need --coordinator HOST:PORT (or --multihost)")
    if None not in (args.num_processes, args.process_id) and args.process_id >= args.num_processes:
        parser.error(f"--process-id {args.process_id} must be below --num-processes {args.num_processes}")


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """--verbose, for `logs.setup(verbose=args.verbose)`."""
    parser.add_argument(
        "--verbose", action="store_true", help="also log other libraries' INFO messages (Orbax, grain, JAX)"
    )
