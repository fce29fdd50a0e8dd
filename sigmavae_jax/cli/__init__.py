"""The command lines: `sigmavae-train`, `sigmavae-eval` and `sigmavae-convert` (installed from
pyproject.toml), the same as `python train.py`, `python eval.py` and
`python convert_torch_weights.py` in a checkout. Each module has `main(argv=None) -> int`."""
