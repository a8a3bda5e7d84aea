"""``mtc verify``: the lowering against onnxruntime, per output."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np

from mtc.errors import MtcError
from mtc.lower.verify import DEFAULT_ATOL, DEFAULT_RTOL


def _load_inputs(specs: tuple[str, ...], names: list[str]) -> list[np.ndarray] | None:
    """``--input x.npy`` in graph-input order, or ``--input NAME=x.npy``."""
    if not specs:
        return None
    by_name: dict[str, np.ndarray] = {}
    positional: list[np.ndarray] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or name.endswith(".npy"):
            name, path = "", spec
        p = Path(path)
        if not p.is_file():
            raise MtcError("no such file", file=path)
        try:
            arr = np.load(p, allow_pickle=False)
        except Exception as e:
            raise MtcError(f"not a .npy array ({type(e).__name__}: {e})", file=path) from None
        if name:
            if name not in names:
                raise MtcError(f"--input {name}=...: the model has no input '{name}' (inputs: {', '.join(names)})")
            by_name[name] = arr
        else:
            positional.append(arr)
    if by_name and positional:
        raise MtcError("--input: give all inputs by position or all as NAME=file.npy, not both")
    if by_name:
        missing = [n for n in names if n not in by_name]
        if missing:
            raise MtcError(f"--input: no array for input(s) {', '.join(missing)}")
        return [by_name[n] for n in names]
    return positional


@click.command("verify")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--input", "input_specs", multiple=True, metavar="[NAME=]FILE.npy",
              help="Input array (.npy), repeated per graph input; random (seeded) by default.")
@click.option("--atol", type=float, default=DEFAULT_ATOL, show_default=True, help="Absolute tolerance.")
@click.option("--rtol", type=float, default=DEFAULT_RTOL, show_default=True,
              help="Tolerance relative to each output's scale (max |onnxruntime output|).")
@click.option("--compile", "use_compile", is_flag=True, help="Also check the module under torch.compile.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--against", "against", type=click.Path(file_okay=False), default=None, metavar="RUN_DIR",
              help="Check an exported model against the run's fixed-policy lowering (as mtc export does).")
@click.option("--task", "task", default=None, metavar="T", help="With --against: compare only this task's output.")
def verify_cmd(model_path: str, input_specs: tuple[str, ...], atol: float, rtol: float, use_compile: bool,
               seed: int, against: str | None = None, task: str | None = None) -> None:
    """Run MODEL lowered to PyTorch and in onnxruntime; exit 0 if every output agrees, 1 if not."""
    if against is not None:
        _verify_against(model_path, against, task, seed)
        return
    if task is not None:
        raise MtcError("--task only applies with --against RUN_DIR")
    from rich.console import Console
    from rich.table import Table

    from mtc.ir import io
    from mtc.ir.opset import convert_opset
    from mtc.lower.verify import _user_inputs, verify

    model = convert_opset(io.load(model_path), file=model_path)
    names = [str(v.name) for v in _user_inputs(model)]
    inputs = _load_inputs(input_specs, names)
    report = verify(model, inputs=inputs, seed=seed, atol=atol, rtol=rtol, compile=use_compile)

    table = Table(title=f"{model_path}: lowering vs onnxruntime (atol {atol:g}, rtol {rtol:g})")
    for col in ("output", "mode", "shape", "max abs diff", "max rel diff", "status"):
        table.add_column(col, justify="right" if "diff" in col else "left", overflow="fold")
    for mode, d in report.rows():
        status = "[green]ok[/green]" if d.ok else f"[red]FAIL[/red] {d.note}".rstrip()
        table.add_row(d.name, mode, "x".join(map(str, d.shape)) or "scalar", f"{d.max_abs:.3g}", f"{d.max_rel:.3g}",
                      status)
    Console(soft_wrap=True).print(table)
    if not report.ok:
        click.echo("outputs differ beyond tolerance", err=True)
        sys.exit(1)


def _verify_against(model_path: str, run_dir: str, task: str | None, seed: int) -> None:
    from mtc.export.api import VerificationError, verify_against

    if not Path(model_path).is_file():
        raise MtcError("no such file", file=model_path)
    try:
        diffs = verify_against(model_path, run_dir, task=task, seed=seed)
    except VerificationError as e:
        click.echo(f"mtc: verification failed: {e}", err=True)
        sys.exit(1)
    for name, d in diffs.items():
        click.echo(f"{name}: max relative difference {d:.3g} against the lowering of {run_dir}: ok")
