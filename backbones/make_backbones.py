"""Regenerate the bundled ONNX backbones from the PyTorch definitions in ``mtc.zoo``.

Run ``make backbones`` (or ``python backbones/make_backbones.py``). Each net goes through the same
PyTorch front end users get from ``mtc import pkg.module:factory``, with a symbolic batch size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mtc import zoo
from mtc.frontends import import_model
from mtc.ir import io

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    for name in zoo.BACKBONES:
        _, shape = zoo.REFERENCE[name]
        model = import_model(f"mtc.zoo:{name}", input_shape=shape)
        model.graph.name = name
        dst = io.save(model, args.out / f"{name}.onnx")
        print(f"wrote {dst}")


if __name__ == "__main__":
    main()
