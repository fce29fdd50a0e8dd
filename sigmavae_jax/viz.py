"""Pictures for people: reconstruction grids, the latent noise robustness curve, the latent
PCA picture and per-channel latent histograms."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from sigmavae_jax import storage


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(..., H, W, C) floats in [-1, 1] -> uint8 in [0, 255] (clipped, rounded)."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def reconstruction_grid(rows: list[np.ndarray], gap: int = 2) -> np.ndarray:
    """Each entry of `rows` is a batch (B, H, W, C) in [-1, 1]; rows are stacked, each
    shows its B images side by side with `gap` white pixels between. -> (R*H', B*W', C) uint8."""
    rows = [to_uint8(r) for r in rows]
    b, h, w, c = rows[0].shape
    grid = np.full((len(rows) * (h + gap) - gap, b * (w + gap) - gap, c), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = image
    return grid


def save_png(path: str | storage.Path, image: np.ndarray) -> storage.Path:
    """Writes a (H, W, 1 | 3) uint8 image as a PNG at `path` (local or gs://; folders are made)."""
    buffer = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, format="png")
    path = storage.path(path)
    storage.write_bytes_atomically(path, buffer.getvalue())
    return path


def _save_figure(figure, path: str | storage.Path, dpi: int) -> storage.Path:
    """Writes a matplotlib figure as a PNG at `path` (local or gs://) and closes it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    path = storage.path(path)
    storage.write_bytes_atomically(path, buffer.getvalue())
    return path


def robustness_figure(path: str | storage.Path, curves: dict[str, list[dict[str, float]]]) -> storage.Path:
    """PSNR (and LPIPS, when measured) against the latent noise sigma, one line per model.

    curves: model name -> the rows of `evaluate.robustness` ({"sigma", "psnr", "lpips"})."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    with_lpips = all(row["lpips"] is not None for rows in curves.values() for row in rows)
    figure, axes = plt.subplots(1, 2 if with_lpips else 1, figsize=(10 if with_lpips else 5, 4), squeeze=False)
    for name, rows in curves.items():
        sigmas = [row["sigma"] for row in rows]
        axes[0, 0].plot(sigmas, [row["psnr"] for row in rows], marker="o", label=name)
        if with_lpips:
            axes[0, 1].plot(sigmas, [row["lpips"] for row in rows], marker="o", label=name)
    axes[0, 0].set(
        xlabel="latent noise sigma (x latent std)", ylabel="PSNR (dB)", title="reconstruction under latent noise"
    )
    if with_lpips:
        axes[0, 1].set(xlabel="latent noise sigma (x latent std)", ylabel="LPIPS", title="perceptual distance")
    for axis in axes.ravel():
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    return _save_figure(figure, path, dpi=100)


def latent_pca_basis(latents: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA over every latent position of (..., C) `latents`: (mean (C,), components (C, k),
    variances (k,)), components ordered by decreasing variance. Each component's sign is fixed
    by the data, not by the eigensolver: its largest-|loading| entry is positive. With C < k
    the missing components are zero vectors of variance 0."""
    flat = np.asarray(latents, np.float64).reshape(-1, np.shape(latents)[-1])
    mean = flat.mean(axis=0)
    centred = flat - mean
    covariance = centred.T @ centred / max(len(flat) - 1, 1)
    variances, vectors = np.linalg.eigh(covariance)  # ascending
    order = np.argsort(variances)[::-1][:k]
    components, variances = vectors[:, order], np.maximum(variances[order], 0.0)
    largest = components[np.argmax(np.abs(components), axis=0), np.arange(components.shape[1])]
    components = components * np.where(largest < 0, -1.0, 1.0)
    if components.shape[1] < k:
        missing = k - components.shape[1]
        components = np.concatenate([components, np.zeros((flat.shape[1], missing))], axis=1)
        variances = np.concatenate([variances, np.zeros(missing)])
    return mean, components, variances


def latent_pca_rgb(latents: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.0)) -> np.ndarray:
    """(B, h, w, C) latents -> (B, h, w, 3) in [0, 1]: the first three principal components
    (PCA over all B*h*w positions, `latent_pca_basis`) as red, green, blue, each mapped
    linearly from its [1st, 99th] percentile to [0, 1] and clipped (a constant component is 0.5)."""
    latents = np.asarray(latents, np.float64)
    mean, components, _ = latent_pca_basis(latents, 3)
    projected = (latents.reshape(-1, latents.shape[-1]) - mean) @ components  # (N, 3)
    low, high = np.percentile(projected, percentiles, axis=0)
    span = high - low
    rgb = np.where(span > 1e-12, (projected - low) / np.where(span > 1e-12, span, 1.0), 0.5)
    return np.clip(rgb, 0.0, 1.0).reshape(*latents.shape[:-1], 3).astype(np.float32)


def _label_font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


LATENT_PCA_COLUMNS = ("original", "reconstruction", "latent PC1-3 as RGB")


def latent_pca_figure(models: dict[str, dict[str, np.ndarray]], gap: int = 2, label_height: int = 18) -> np.ndarray:
    """One row group per model, stacked top to bottom under a column header, each group headed
    by the model's name; every row is `original | reconstruction | latent PCA` of one image.

    models: name -> {"images": (B, H, W, 3) in [-1, 1], "reconstructions": the same shape,
    "latents": (B, h, w, C)}. The PCA is over all latent positions of that model's images
    (`latent_pca_rgb`), shown nearest-upsampled to the image size. -> (height, 3*W+2*gap, 3) uint8."""
    from PIL import Image as PILImage
    from PIL import ImageDraw

    groups = []
    for name, item in models.items():
        images, latents = np.asarray(item["images"]), np.asarray(item["latents"])
        h, w = images.shape[1:3]
        if h % latents.shape[1] or w % latents.shape[2]:
            raise ValueError(
                f"{name}: image size {h}x{w} is not a multiple of the latent size {latents.shape[1]}x{latents.shape[2]}"
            )
        pca = latent_pca_rgb(latents).repeat(h // latents.shape[1], axis=1).repeat(w // latents.shape[2], axis=2)
        reconstructions = np.asarray(item["reconstructions"])
        rows = [np.stack([images[i], reconstructions[i], pca[i] * 2.0 - 1.0]) for i in range(len(images))]
        groups.append((name, reconstruction_grid(rows, gap=gap)))
    width = max(grid.shape[1] for _, grid in groups)
    height = label_height + sum(label_height + grid.shape[0] + gap for _, grid in groups)
    canvas = PILImage.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = _label_font(label_height - 6)
    column = (width + gap) // 3
    for i, title in enumerate(LATENT_PCA_COLUMNS):
        draw.text((i * column + 2, 2), title, fill="black", font=font)
    top = label_height
    for name, grid in groups:
        draw.rectangle((0, top, width - 1, top + label_height - 2), fill=(225, 225, 225))
        draw.text((2, top + 2), name, fill="black", font=font)
        canvas.paste(PILImage.fromarray(grid), (0, top + label_height))
        top += label_height + grid.shape[0] + gap
    return np.asarray(canvas)


def latent_histograms(samples: dict[str, np.ndarray], bins: int = 50) -> list[dict]:
    """Per-channel histograms of raw latent values, several models on shared bins.

    samples: model name -> (N, C) latent values (rows are latent positions). Returns one entry
    per channel (up to the largest C) with "edges" (bins+1,), and per model present in that
    channel "density" (bins,) (numpy `density=True`: integrates to 1 over the edges, values
    outside the edges left out), "mean", "std" (of all N values). The edges span the models'
    0.1th..99.9th percentiles and at least [-4, 4], where N(0, 1) is drawn."""
    channels = max(np.shape(values)[-1] for values in samples.values())
    out = []
    for c in range(channels):
        present = {name: np.asarray(v, np.float64)[:, c] for name, v in samples.items() if np.shape(v)[-1] > c}
        pooled = np.concatenate(list(present.values()))
        low, high = np.percentile(pooled, [0.1, 99.9])
        edges = np.linspace(min(low, -4.0), max(high, 4.0), bins + 1)
        out.append(
            {
                "edges": edges,
                "density": {name: np.histogram(v, bins=edges, density=True)[0] for name, v in present.items()},
                "mean": {name: float(v.mean()) for name, v in present.items()},
                "std": {name: float(v.std()) for name, v in present.items()},
            }
        )
    return out


def latent_histogram_figure(path: str | storage.Path, samples: dict[str, np.ndarray], bins: int = 50) -> storage.Path:
    """One small panel per latent channel: each model's histogram of the raw values (steps,
    density) against the N(0, 1) density (dashed), each model's mean/std in the title.

    samples: model name -> (N, C) latent values (`latent_histograms`)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    hists = latent_histograms(samples, bins)
    columns = int(np.ceil(np.sqrt(len(hists))))
    rows = int(np.ceil(len(hists) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for c, (axis, hist) in enumerate(zip(axes.ravel(), hists)):
        x = np.linspace(hist["edges"][0], hist["edges"][-1], 200)
        axis.plot(x, np.exp(-0.5 * x**2) / np.sqrt(2 * np.pi), "k--", lw=1, label="N(0, 1)")
        for i, name in enumerate(samples):
            if name in hist["density"]:
                axis.stairs(hist["density"][name], hist["edges"], color=colours[i % len(colours)], lw=1.2, label=name)
        stats = "\n".join(f"{hist['mean'][n]:+.2f} / {hist['std'][n]:.2f}" for n in samples if n in hist["mean"])
        axis.set_title(
            f"ch {c}: mean / std {stats}" if len(hist["mean"]) == 1 else f"ch {c}: mean / std\n{stats}", fontsize=8
        )
        axis.tick_params(labelsize=7)
    for axis in axes.ravel()[len(hists) :]:
        axis.axis("off")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.04 + 0.1 / rows, 1, 1))
    return _save_figure(figure, path, dpi=80)
