"""`make demo`: train configs/tiny.yaml on the real photos scikit-image ships (nothing is
downloaded), then report PSNR on held-out photos before and after training.

    python -m sigmavae_jax.demo [key=value ...]     # e.g. workdir=runs/demo train.steps=100
"""

from __future__ import annotations

import pathlib
import shutil
import sys
import time

import jax
import numpy as np

import sigmavae_jax
from sigmavae_jax import data, logs, metrics, topology, viz
from sigmavae_jax.api import build_model, codec_from_model
from sigmavae_jax.config import load_config, parse_overrides
from sigmavae_jax.train.loop import train
from sigmavae_jax.train.state import build_structure, init_state

# Photos (not drawings or test charts) shipped with scikit-image; three are held out.
TRAIN_PHOTOS = (
    "astronaut.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "retina.jpg",
    "camera.png",
    "brick.png",
    "grass.png",
    "gravel.png",
    "moon.png",
    "coins.png",
)
HELDOUT_PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg")
EVAL_SIZE = 128
# Ten CPU minutes are too few for the adversarial phase to pay off in PSNR: the demo trains
# reconstruction (L1 + LPIPS + KL) only, on 64x64 crops of photos resized to 128.
DEFAULTS = [
    "workdir=demo_workdir",
    "train.steps=400",
    "loss.disc_weight=0",
    "optim.lr=1e-3",
    "data.resize=128",
    "log.every=25",
    "log.images_every=100",
    "checkpoint.every=100",
]


def prepare_photos(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """Copies the photos into root/train and root/heldout."""
    import skimage

    source = pathlib.Path(skimage.__file__).parent / "data"
    folders = []
    for name, files in (("train", TRAIN_PHOTOS), ("heldout", HELDOUT_PHOTOS)):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for file in files:
            if not (folder / file).exists():
                shutil.copy(source / file, folder / file)
        folders.append(folder)
    return folders[0], folders[1]


def heldout_images(cfg) -> np.ndarray:
    batches = data.eval_batches(cfg, size=EVAL_SIZE, batch_size=len(HELDOUT_PHOTOS))
    images, count = next(iter(batches))
    return images[:count]


def mean_psnr(reconstruct, images: np.ndarray) -> float:
    return float(np.mean(metrics.psnr(metrics.to_unit_range(images), metrics.to_unit_range(reconstruct(images)))))


def main(argv: list[str] | None = None) -> int:
    logs.setup()
    topology.quiet_libtpu_on_a_host_without_tpu()
    overrides = DEFAULTS + list(sys.argv[1:] if argv is None else argv)
    workdir = pathlib.Path(parse_overrides(overrides)["workdir"])
    train_dir, heldout_dir = prepare_photos(workdir / "photos")
    cfg = load_config("tiny", [f"data.path={train_dir}", *overrides])
    heldout = heldout_images(cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(heldout_dir)})}))

    initial = init_state(cfg, build_structure(cfg), jax.random.key(cfg.seed))  # what training starts from
    before = codec_from_model(build_model(cfg.model, initial.params["vae"]), cfg)
    psnr_before = mean_psnr(before.reconstruct, heldout)

    start = time.perf_counter()
    result = train(cfg)
    codec = sigmavae_jax.load(result.export)
    psnr_after = mean_psnr(codec.reconstruct, heldout)
    grid = viz.reconstruction_grid(
        [heldout, np.asarray(before.reconstruct(heldout)), np.asarray(codec.reconstruct(heldout))]
    )
    figure = viz.save_png(result.workdir / "demo_heldout_before_after.png", grid)
    print(f"trained {result.step} steps in {time.perf_counter() - start:.0f} s; workdir {result.workdir}")
    print(f"held-out originals / before / after: {figure}")
    print(f"demo: PSNR before {psnr_before:.2f} dB, after {psnr_after:.2f} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
