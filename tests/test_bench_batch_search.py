"""The benches' search for the largest batch per chip (bench/tpu_dry_run.py), on made-up
memory lines instead of compiles: the prediction from two points, the step-down and the search from above."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("tpu_dry_run", ROOT / "bench" / "tpu_dry_run.py")
tpu_dry_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tpu_dry_run)

GIB = 2**30
CAPACITY = 16 * GIB


def figures(batch: int, fixed_gib: float, per_image_gib: float) -> dict:
    total = (fixed_gib + per_image_gib * batch) * GIB
    return {"hbm_total": total, "hbm_capacity": CAPACITY, "fits": total <= tpu_dry_run.MARGIN * CAPACITY}


def test_the_prediction_is_the_largest_batch_under_the_margin_on_the_line():
    at = {b: figures(b, 2.0, 0.25) for b in (8, 16)}
    predicted = tpu_dry_run.predicted_largest(at)
    assert figures(predicted, 2.0, 0.25)["fits"]
    assert not figures(predicted + 1, 2.0, 0.25)["fits"]


def test_a_batch_that_does_not_fit_steps_down_until_one_fits_and_every_compile_is_kept():
    compiled = []

    def compile_at(batch):  # the real memory grows faster than the line predicted
        compiled.append(batch)
        return figures(batch, 2.0, 0.3)

    at = {}
    found = tpu_dry_run.fitting_at_or_below(64, compile_at, at)
    assert compiled[0] == 64 and compiled[-1] == found and compiled == sorted(compiled, reverse=True)
    assert at[found]["fits"] and sorted(at) == sorted(compiled)
    assert all(not at[b]["fits"] for b in compiled[:-1])


def test_when_nothing_fits_the_search_ends_at_one_per_chip_and_says_it_does_not_fit():
    at = {}
    found = tpu_dry_run.fitting_at_or_below(5, lambda batch: figures(batch, 20.0, 0.1), at)
    assert found == 1 and not at[1]["fits"]


def test_the_search_from_above_finds_the_largest_batch_with_at_most_two_that_fit():
    for largest in (1, 7, 39, 72, 100, 149):
        compiled = []

        def compile_at(batch):  # fits up to `largest`, whatever the line said
            compiled.append(batch)
            return {"fits": batch <= largest}

        at = {}
        found = tpu_dry_run.largest_from_above(150, compile_at, at)
        assert found == largest, (largest, compiled)
        assert sum(batch <= largest for batch in compiled) <= 2
        assert sorted(at) == sorted(compiled) and len(set(compiled)) == len(compiled)
        if largest >= 39:  # steps of 4% (of one, below 25): far fewer compiles than a step of one
            assert len(compiled) <= 40, compiled


def test_the_search_from_above_says_when_its_start_fits_and_when_nothing_does():
    assert tpu_dry_run.largest_from_above(40, lambda batch: {"fits": True}, {}) == 40
    assert tpu_dry_run.largest_from_above(40, lambda batch: {"fits": False}, {}) == 0
