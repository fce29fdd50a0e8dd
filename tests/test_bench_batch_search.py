"""The benches' searches for the largest batch per chip, on made-up memory curves instead of
compiles: bench/gpu_dry_run.py's prediction from two points and step-down, bench/tpu_dry_run.py's
search from above."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tpu_dry_run, gpu_dry_run = _bench("tpu_dry_run"), _bench("gpu_dry_run")

GIB = 2**30
CAPACITY = 16 * GIB


def figures(batch: int, fixed_gib: float, per_image_gib: float) -> dict:
    total = (fixed_gib + per_image_gib * batch) * GIB
    return {"hbm_total": total, "hbm_capacity": CAPACITY, "fits": total <= tpu_dry_run.MARGIN * CAPACITY}


def test_the_prediction_is_the_largest_batch_under_the_margin_on_the_line():
    at = {b: figures(b, 2.0, 0.25) for b in (8, 16)}
    predicted = gpu_dry_run.predicted_largest(at)
    assert figures(predicted, 2.0, 0.25)["fits"]
    assert not figures(predicted + 1, 2.0, 0.25)["fits"]


def test_a_batch_that_does_not_fit_steps_down_until_one_fits_and_every_compile_is_kept():
    compiled = []

    def compile_at(batch):  # the real memory grows faster than the line predicted
        compiled.append(batch)
        return figures(batch, 2.0, 0.3)

    at = {}
    found = gpu_dry_run.fitting_at_or_below(64, compile_at, at)
    assert compiled[0] == 64 and compiled[-1] == found and compiled == sorted(compiled, reverse=True)
    assert at[found]["fits"] and sorted(at) == sorted(compiled)
    assert all(not at[b]["fits"] for b in compiled[:-1])


def test_when_nothing_fits_the_search_ends_at_one_per_chip_and_says_it_does_not_fit():
    at = {}
    found = gpu_dry_run.fitting_at_or_below(5, lambda batch: figures(batch, 20.0, 0.1), at)
    assert found == 1 and not at[1]["fits"]


def memory_curve(largest: int, knee_fraction: float):
    """HBM totals (GiB) of a made-up program that fits up to `largest` per chip: along a line
    with a fixed part up to a knee, then growing a quarter as fast (the compiler's own
    recomputation near the limit)."""
    limit = tpu_dry_run.MARGIN * 16
    fixed = 1.5
    knee = max(1.0, knee_fraction * largest)
    # the slope that puts the limit between largest and largest + 1
    slope = (limit - fixed) / (knee + (largest + 0.5 - knee) / 4)

    def total(batch: int) -> float:
        return fixed + slope * min(batch, knee) + slope / 4 * max(0.0, batch - knee)

    assert total(largest) <= limit < total(largest + 1)
    return total


def test_the_search_from_above_ends_within_its_step_under_the_largest_batch_with_one_compile_that_fits():
    for largest in (1, 7, 39, 72, 112, 255):
        for knee_fraction in (1.0, 0.8, 0.5):
            total = memory_curve(largest, knee_fraction)
            compiled = []

            def compile_at(batch):
                compiled.append(batch)
                return figures(batch, total(batch), 0.0)

            at = {}
            found = tpu_dry_run.largest_from_above(256, compile_at, at)
            case = (largest, knee_fraction, compiled)
            assert largest * (1 - tpu_dry_run.SEARCH_STEP) - 1 <= found <= largest, case
            assert at[found]["fits"] and sum(at[b]["fits"] for b in compiled) == 1, case
            assert compiled == sorted(compiled, reverse=True) and sorted(at) == sorted(compiled), case
            refused = tpu_dry_run.smallest_refused_above(at, found)
            assert found <= largest < refused, case  # the bracket the bench prints holds the largest
            # a refusal's figure takes the search down in proportion: a few compiles, not dozens
            assert len(compiled) <= 12, case


def test_the_search_from_above_steps_down_when_a_refusal_gives_no_figure():
    compiled = []

    def compile_at(batch):
        compiled.append(batch)
        return {"fits": batch <= 50, "hbm_total": 0, "hbm_capacity": CAPACITY}

    found = tpu_dry_run.largest_from_above(100, compile_at, {})
    assert 50 * (1 - tpu_dry_run.SEARCH_STEP) - 1 <= found <= 50 and compiled[1] == 96


def test_the_search_from_above_says_when_its_start_fits_and_when_nothing_does():
    at = {}
    assert tpu_dry_run.largest_from_above(40, lambda batch: figures(batch, 1.0, 0.0), at) == 40
    assert tpu_dry_run.smallest_refused_above(at, 40) is None
    assert tpu_dry_run.largest_from_above(40, lambda batch: figures(batch, 20.0, 0.0), {}) == 0
