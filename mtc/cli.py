"""The ``mtc`` command line.

Search spaces and strategies declare their options once (:class:`mtc.spaces.Option`); the commands
``compile``, ``check`` and ``search`` turn them into click options when they are first parsed or
asked for ``--help``, so ``mtc --help`` loads no space and no command names one.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from mtc import __version__
from mtc.errors import MtcError


class MtcGroup(click.Group):
    """Turns user errors into one stderr line and exit code 2, with no traceback: mtc's own
    errors and click's usage errors (a bad option value, a missing argument, an unknown command)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MtcError as e:
            click.echo(f"mtc: error: {e}", err=True)
            sys.exit(e.exit_code)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "mtc"
            click.echo(f"mtc: error: {e.format_message().rstrip('.')} (see {where} --help)", err=True)
            sys.exit(e.exit_code)
        except OSError as e:
            # The environment at write or read time: a read-only folder, a full disk, a permission.
            where = e.filename or e.filename2
            what = e.strerror or type(e).__name__
            click.echo(f"mtc: error: {where}: {what}" if where else f"mtc: error: {what}", err=True)
            sys.exit(MtcError.exit_code)
        except KeyboardInterrupt:
            click.echo("mtc: interrupted; files written so far are complete, and a run keeps its last checkpoint "
                       "(--resume continues it)", err=True)
            sys.exit(130)


class Number(click.ParamType):
    """A finite float within a range (click's FloatRange lets NaN and infinities through)."""

    name = "number"

    def __init__(self, min: float | None = None, max: float | None = None, *, min_open: bool = False,
                 max_open: bool = False) -> None:
        self.min, self.max, self.min_open, self.max_open = min, max, min_open, max_open

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        import math

        if isinstance(value, float) and math.isfinite(value):
            v = value
        else:
            try:
                v = float(value)
            except (TypeError, ValueError):
                self.fail(f"{value!r} is not a number", param, ctx)
            if not math.isfinite(v):
                self.fail(f"{value!r} is not a finite number", param, ctx)
        lo_bad = self.min is not None and (v < self.min or (self.min_open and v == self.min))
        hi_bad = self.max is not None and (v > self.max or (self.max_open and v == self.max))
        if lo_bad or hi_bad:
            parts = []
            if self.min is not None:
                parts.append(f"{'>' if self.min_open else '>='} {self.min:g}")
            if self.max is not None:
                parts.append(f"{'<' if self.max_open else '<='} {self.max:g}")
            self.fail(f"{v:g} is out of range ({' and '.join(parts)})", param, ctx)
        return v


class PluginCommand(click.Command):
    """A command whose last options come from the space registry, added on first use."""

    def __init__(self, *args: Any, plugin_params: Callable[[], list[click.Parameter]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plugin_params = plugin_params
        self._added = False

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not self._added:
            self._added = True
            self.params.extend(self._plugin_params())
        return super().get_params(ctx)


def human(n: float) -> str:
    from mtc.ir.cost import human as _human  # not at start-up: it loads onnx_ir

    return _human(n)


def _one_line_warnings() -> None:
    """mtc's own warnings as one stderr line each (Python's format adds the source line)."""
    import warnings

    default = warnings.showwarning

    def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        if category.__module__.startswith("mtc."):
            click.echo(f"mtc: warning: {str(message).splitlines()[0] if str(message) else category.__name__}",
                       err=True)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


@click.group(cls=MtcGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mtc")
def main() -> None:
    """mtc: compile a single-task CNN backbone into a multi-task model."""
    _one_line_warnings()


# ------------------------------------------------------------------------------ shared option sets
def _frontend_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--input-shape, --opset, --exporter, --seed: how a backbone is imported."""
    for deco in reversed([
        click.option("--input-shape", metavar="DIMS", default=None,
                     help="Input shape, e.g. 1,3,224,224 (required for PyTorch sources and symbolic spatial sizes)."),
        click.option("--opset", type=click.IntRange(min=1), default=None,
                     help="Target ONNX opset (17 or newer; default 18)."),
        click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default="dynamo", show_default=True,
                     help="torch.onnx exporter for PyTorch sources."),
        click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Seed of prototxt weight fillers and of new weights."),
    ]):
        f = deco(f)
    return f


def _compile_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--feature, --head-width: how a backbone and tasks become a supergraph (``--space`` and the
    spaces' own options are added by :func:`_space_params`)."""
    for deco in reversed([
        click.option("--feature", default=None, metavar="TENSOR", help="Tensor the heads attach to (default: found)."),
        click.option("--head-width", type=click.IntRange(min=1, max=65536), default=None,
                     help="ASPP head width (default 256; AutoMTL: 1024)."),
    ]):
        f = deco(f)
    return f


def _click_type(o: Any) -> Any:
    d = o.default
    if o.choices is not None:
        return click.Choice(list(o.choices))
    if o.parse is not None or isinstance(d, str) or d is None:
        return str
    if isinstance(d, int):
        return click.IntRange(min=None if o.low is None else int(o.low), max=None if o.high is None else int(o.high),
                              min_open=o.low_open, max_open=o.high_open)
    if isinstance(d, float):
        return Number(o.low, o.high, min_open=o.low_open, max_open=o.high_open)
    return str


def _plugin_option(name: str, decls: list[tuple[str, Any]], owner: str) -> click.Option:
    """One click option for an option name that one or more spaces/strategies declare."""
    o = decls[0][1]
    flag = o.flag
    who = "; ".join(f"{w}: {d.help} [default {d.default}]" for w, d in decls)
    help_text = f"({owner} {', '.join(w for w, _ in decls)}) {who}"
    if isinstance(o.default, bool):
        return click.Option([f"{flag}/--no-{flag[2:]}", name], default=None, help=help_text)
    return click.Option([flag, name], type=_click_type(o), default=None, metavar=o.metavar, help=help_text)


def _space_params() -> list[click.Parameter]:
    from mtc.spaces import all_compile_options, spaces

    listing = "; ".join(f"{n}: {sp.help}" for n, sp in sorted(spaces().items()))
    params: list[click.Parameter] = [
        click.Option(["--space", "space"], default=None, metavar="NAME",
                     help=f"Search space (default automtl). Spaces: {listing}."),
        click.Option(["--list-spaces", "list_spaces"], is_flag=True, default=False,
                     help="Print the search spaces, their options and strategies, then exit."),
    ]
    for name, decls in sorted(all_compile_options().items()):
        params.append(_plugin_option(name, [(sp, o) for sp, o in decls], "space"))
    return params


def _strategy_params() -> list[click.Parameter]:
    from mtc.spaces import all_strategy_options

    return [_plugin_option(name, [(f"{sp}/{st}", o) for sp, st, o in decls], "strategy")
            for name, decls in sorted(all_strategy_options().items())]


def _given(kwargs: dict[str, Any], names: set[str]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k in names and v is not None}


def _space_options(space_name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The options given for ``space_name``; one declared only by another space is an error."""
    from mtc.spaces import all_compile_options, get_space

    sp = get_space(space_name)
    given = _given(kwargs, set(all_compile_options()))
    own = {o.name for o in sp.compile_options}
    for k in given:
        if k not in own:
            raise MtcError(f"--{k.replace('_', '-')} does not apply to space '{sp.name}'")
    return given


def _print_spaces() -> None:
    from mtc.spaces import spaces

    for name, sp in sorted(spaces().items()):
        click.echo(f"{name}: {sp.help}")
        for o in sp.compile_options:
            click.echo(f"  compile {o.flag}: {o.help} [default {o.default}]")
        for st in sp.strategies.values():
            star = " (default)" if st.name == sp.default_strategy else ""
            click.echo(f"  strategy {st.name}{star}: {st.help}")


def _import(src: str, input_shape: str | None, opset: int | None, exporter: str, seed: int):
    from mtc.frontends import import_model, parse_input_shape
    from mtc.ir.opset import TARGET_OPSET

    return import_model(
        src, input_shape=parse_input_shape(input_shape), opset=opset or TARGET_OPSET, exporter=exporter, seed=seed
    )


def _refuse_overwrite(out: str | Path, *inputs: str | Path | None, what: str = "-o") -> None:
    """An output that would replace one of the command's inputs (same file, links resolved) is refused."""
    o = Path(out)
    for i in inputs:
        if i is None:
            continue
        p = Path(i)
        try:
            same = o.exists() and p.exists() and o.samefile(p)
        except OSError:
            same = False
        if same or (not o.exists() and o.resolve() == p.resolve()):
            raise MtcError(f"{what} {out} would replace the input {i}: write to another file", file=str(out))


# ------------------------------------------------------------------------------------------ import
@main.command("import")
@click.argument("src")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), default=None,
              help="Output .onnx file (default: SRC's stem + .onnx in the working directory).")
@_frontend_options
def import_cmd(src: str, out: str | None, input_shape: str | None, opset: int | None, exporter: str, seed: int) -> None:
    """Import a backbone (.onnx, .prototxt, or pkg.module:factory) into the mtc IR as ONNX."""
    from mtc.frontends import default_output
    from mtc.ir import io
    from mtc.ir.cost import model_cost

    dst = out or default_output(src)
    _refuse_overwrite(dst, src if Path(src).exists() else None)
    model = _import(src, input_shape, opset, exporter, seed)
    written = io.save(model, dst)
    params, macs, _ = model_cost(model)
    click.echo(f"wrote {written}: {len(list(model.graph))} nodes, {human(params)} params, {human(macs)} MACs")


# ----------------------------------------------------------------------------------------- inspect
@main.command("inspect")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON (keys in docs/inspect.md).")
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True,
              help="How many of the heaviest nodes to list.")
@click.option("--channels", is_flag=True,
              help="List the channel dependency groups instead: id, size, members, prunable or why not "
                   "(docs/channels.md).")
@_frontend_options
def inspect_cmd(model: str, as_json: bool, top: int, channels: bool, input_shape: str | None, opset: int | None,
                exporter: str, seed: int) -> None:
    """Summarise a model: interface, op histogram, parameters, MACs, heaviest nodes, branch points."""
    from mtc.ir import supergraph as sg
    from mtc.ir.summary import summarize

    m = _load_any(model, input_shape, opset, exporter, seed)
    if channels:
        from mtc.ir.channels import analyze

        ch = analyze(m)
        click.echo(json.dumps(ch.to_json(), indent=2) if as_json else ch.format())
        return
    s = summarize(m, top=top, source=model)
    if sg.is_supergraph(m):
        from mtc.spaces import space_of_model

        sup = sg.summarize_supergraph(m)
        # What the space adds (AutoMTL: VCNs, skips, copy and skip parameters) joins the generic keys.
        for k, v in space_of_model(m, file=model).summary(m).items():
            sup.setdefault(k, v)
        s["supergraph"] = sup
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    _print_summary(s)
    if "supergraph" in s:
        _print_supergraph(s["supergraph"])


def _load_any(src: str, input_shape: str | None, opset: int | None, exporter: str, seed: int):
    """A compiled supergraph is read as it is; anything else goes through the import pipeline."""
    from mtc.ir import io
    from mtc.ir import supergraph as sg

    if src.endswith(".onnx") and input_shape is None:
        m = io.load(src)
        if sg.format_of(m) is not None:
            sg.check_format(m, file=src)
            return m
    return _import(src, input_shape, opset, exporter, seed)


def _print_supergraph(sup: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    tasks = ", ".join(f"{t['name']}:{t['kind']}:{t['channels']}" for t in sup["tasks"])
    ss = sup["search_space"]
    ch = ", ".join(f"{n} {k}" for k, n in sup["choices"].items() if n)
    con.print(f"[bold]supergraph[/bold] ({sup['space'].get('name', '?')}): tasks {tasks}; choice points: {ch}; "
              f"op-choice search space ≈ 10^{ss['log10_size']} plans")
    if "vcns" in sup:
        con.print(f"{sup['vcns']} VCNs; skips: " + ", ".join(f"{k} {n}" for k, n in sup.get("skips", {}).items()))
        for v in sup.get("without_skip", []):
            con.print(f"  VCN {v['vcn']} has no skip (shared or task-specific only): {v['why']}")
    p = sup["params"]
    t = Table(title="Parameters by part")
    for col in ("shared", "options (copies, skips)", "heads"):
        t.add_column(col, justify="right")
    t.add_row(f"{p['shared']:,}", f"{p['options']:,}", f"{p['heads']:,}")
    con.print(t)
    m = Table(title="MACs per sample")
    m.add_column("task")
    m.add_column("first option everywhere", justify="right")
    m.add_column("cheapest option everywhere", justify="right")
    for name, v in sup["macs"]["per_task"].items():
        m.add_row(name, f"{v['first']:,}", f"{v['cheapest']:,}")
    con.print(m)
    tot = sup["macs"]["total"]
    con.print(f"all tasks: {tot['all_shared']:,} MACs on one shared stream, {tot['all_specific']:,} with one "
              "full path per task")


def _print_summary(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"[bold]{s['source']}[/bold]  graph '{s['graph']}', opset {s['opset']}, {s['nodes']} nodes, "
              f"{human(s['params'])} params ({s['params']:,}), {human(s['macs'])} MACs ({s['macs']:,})")
    io_t = Table(title="Interface", show_header=True)
    io_t.add_column("kind")
    io_t.add_column("name")
    io_t.add_column("shape")
    io_t.add_column("dtype")
    for kind in ("inputs", "outputs"):
        for v in s[kind]:
            shape = "?" if v["shape"] is None else "[" + ",".join("?" if d is None else str(d) for d in v["shape"]) + "]"
            io_t.add_row(kind[:-1], v["name"], shape, v["dtype"] or "?")
    con.print(io_t)
    ops = Table(title="Ops")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, n in s["ops"].items():
        ops.add_row(op, str(n))
    con.print(ops)
    heavy = Table(title=f"Heaviest {len(s['heaviest'])} nodes")
    for col in ("node", "op", "MACs", "params", "origin"):
        heavy.add_column(col, justify="right" if col in ("MACs", "params") else "left")
    for h in s["heaviest"]:
        heavy.add_row(h["name"], h["op"], f"{h['macs']:,}", f"{h['params']:,}", h["origin"] or "")
    con.print(heavy)
    bp = s["branch_points"]
    con.print(f"[bold]{bp['count']} candidate branch points[/bold]: " + ", ".join(bp["names"]))


# ----------------------------------------------------------------------------------------- compile
@main.command("compile", cls=PluginCommand, plugin_params=_space_params)
@click.argument("model", required=False)
@click.option("--tasks", "tasks", default=None, metavar="SPEC",
              help="Tasks as name[:kind][:channels], comma-separated, e.g. seg:seg:13,depth:depth:1.")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), default=None,
              help="Output supergraph (default: MODEL's stem + .mtc.onnx).")
@_compile_options
@click.option("--passes", default=None, metavar="A,B,..", help="Pass pipeline (default: the full compile).")
@click.option("--dump-after", "dump_after", multiple=True, metavar="PASS", help="Dump the graph after PASS.")
@click.option("--dump-dir", type=click.Path(file_okay=False), default=None,
              help="Directory for ONNX-text dumps (default: OUTPUT's stem + .dump when --dump-after is given).")
@_frontend_options
def compile_cmd(model: str | None, tasks: str | None, out: str | None, feature: str | None, head_width: int | None,
                passes: str | None, dump_after: tuple[str, ...], dump_dir: str | None,
                input_shape: str | None, opset: int | None, exporter: str, seed: int, **kwargs: Any) -> None:
    """Compile a backbone and a task list into a multi-task supergraph (.mtc.onnx) of a search space."""
    import time

    from mtc.frontends import default_output
    from mtc.ir import io
    from mtc.spaces import DEFAULT_SPACE, compile_supergraph
    from mtc.tasks import parse_tasks

    space = kwargs.pop("space", None)
    if kwargs.pop("list_spaces", False):
        _print_spaces()
        return
    if model is None or tasks is None:
        raise MtcError("mtc compile needs MODEL and --tasks (see mtc compile --help)")
    space = space or DEFAULT_SPACE
    space_opts = _space_options(space, kwargs)
    task_list = parse_tasks(tasks)  # fail on a bad spec before any import work
    dst = Path(out) if out else Path(default_output(model).stem + ".mtc.onnx")
    _refuse_overwrite(dst, model if Path(model).exists() else None)
    t0 = time.perf_counter()
    m = _import(model, input_shape, opset, exporter, seed)
    t_import = time.perf_counter() - t0
    if dump_after and dump_dir is None:
        dump_dir = str(dst.with_suffix("").with_suffix("")) + ".dump"
    res = compile_supergraph(m, tasks=task_list, feature=feature, head_width=256 if head_width is None else head_width,
                             seed=seed, space=space, passes=passes, dump_dir=dump_dir, dump_after=dump_after,
                             **space_opts)
    click.echo(f"{'import':<16}{t_import * 1000:9.1f} ms")
    for r in res.records:
        click.echo(f"{r.name:<16}{r.seconds * 1000:9.1f} ms  {'modified' if r.modified else 'unchanged':<9}"
                   f"  {r.nodes} nodes")
    t1 = time.perf_counter()
    io.save(res.model, dst)
    click.echo(f"{'save':<16}{(time.perf_counter() - t1) * 1000:9.1f} ms")
    click.echo(f"wrote {dst}")


# ------------------------------------------------------------------------------------------- check
@main.command("check", cls=PluginCommand, plugin_params=_space_params)
@click.argument("model")
@click.option("--golden", required=True, type=click.Path(dir_okay=False), metavar="FILE.json",
              help="Golden snapshot to compare with (keys in docs/check.md).")
@click.option("--update", is_flag=True, help="Write or overwrite the golden with MODEL's snapshot.")
@click.option("--tasks", "tasks", default=None, metavar="SPEC",
              help="Compile MODEL (a backbone) for these tasks first, e.g. seg,depth.")
@_compile_options
@_frontend_options
def check_cmd(model: str, golden: str, update: bool, tasks: str | None, feature: str | None,
              head_width: int | None, input_shape: str | None, opset: int | None,
              exporter: str, seed: int, **kwargs: Any) -> None:
    """Compare MODEL's graph snapshot with a golden JSON file: exit 0 if equal, 1 with a diff if not.

    MODEL is a compiled supergraph (.mtc.onnx), a plain model, or, with --tasks, a backbone that is
    compiled in memory first.
    """
    from mtc import check as chk
    from mtc.spaces import DEFAULT_SPACE

    space = kwargs.pop("space", None)
    if kwargs.pop("list_spaces", False):
        _print_spaces()
        return
    space_opts = _space_options(space or DEFAULT_SPACE, kwargs)
    if tasks is None and (feature is not None or head_width is not None or space is not None or space_opts):
        raise MtcError("--feature, --head-width, --space and the space's options only apply with --tasks")
    dst = Path(golden)
    _refuse_overwrite(dst, model if Path(model).exists() else None, what="--golden")
    # Read the golden before any compile work, so a missing or broken one fails fast.
    old: dict[str, Any] | None = None
    note = ""
    if not update:
        old = chk.read_golden(dst)
    elif dst.exists():
        try:
            old = chk.read_golden(dst)
        except MtcError:
            note = " (the old file was not a usable golden)"
    m = chk.load_model(model, tasks=tasks, feature=feature, head_width=256 if head_width is None else head_width,
                       seed=seed, input_shape=input_shape, opset=opset, exporter=exporter, space=space,
                       space_options=space_opts)
    snap = chk.snapshot(m)
    diff = chk.compare(old, snap) if old is not None else []
    if update:
        if old is None:
            chk.write_golden(dst, snap)
            click.echo(f"wrote {dst}: new golden for {model}{note}")
            return
        for line in diff:
            click.echo(f"  {line}")
        # Rewrite when only the formatting differs too, so goldens stay canonical.
        if diff or dst.read_text(encoding="utf-8") != chk.dumps_golden(snap):
            chk.write_golden(dst, snap)
            click.echo(f"updated {dst}: {len(diff)} difference{'s' if len(diff) != 1 else ''} accepted")
        else:
            click.echo(f"{dst} is up to date with {model}")
        return
    if not diff:
        click.echo(f"OK: {model} matches {dst}")
        return
    click.echo(f"FAIL: {model} differs from {dst} ({len(diff)} difference{'s' if len(diff) != 1 else ''}):")
    for line in diff:
        click.echo(f"  {line}")
    click.echo("If the change is intended, run the same command with --update and commit the golden file.")
    sys.exit(1)


# ------------------------------------------------------------------------------------------ search
def _load_supergraph(path: str):
    from mtc.ir import io
    from mtc.ir import supergraph as sg

    m = io.load(path)
    sg.check_format(m, file=path)
    return m


def _input_chw(model) -> tuple[int, int, int]:
    dims = list(model.graph.inputs[0].shape)
    return tuple(int(d) for d in dims[1:])  # type: ignore[return-value]


def _task_weights(text: str | None, tasks) -> dict[str, float] | None:
    import math

    if not text:
        return None
    out: dict[str, float] = {}
    names = {t.name for t in tasks}
    for item in text.split(","):
        name, _, val = item.partition("=")
        if name.strip() not in names:
            raise MtcError(f"--task-weights: '{name.strip()}' is not a task ({', '.join(sorted(names))})")
        try:
            w = float(val)
        except ValueError:
            raise MtcError(f"--task-weights: '{item}' needs a number, e.g. seg=5") from None
        if not math.isfinite(w) or w < 0:
            raise MtcError(f"--task-weights: '{item}': a weight must be a finite number >= 0")
        out[name.strip()] = w
    return out


def _run_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options every training command shares."""
    for deco in reversed([
        click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True),
        click.option("--checkpoint-every", type=click.IntRange(min=1), default=50, show_default=True,
                     help="Steps between checkpoints."),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: cuda when present."),
        click.option("--amp", type=click.Choice(["bf16", "fp16"]), is_flag=False, flag_value="bf16", default=None,
                     help="Mixed precision: --amp (bf16) bfloat16 autocast on CPU or CUDA; --amp fp16 float16 with a "
                          "gradient scaler (CUDA). Losses and metrics stay float32."),
        click.option("--weighting", type=click.Choice(["equal", "uncertainty", "dwa", "gradnorm", "pcgrad"]),
                     default="equal", show_default=True,
                     help="Task loss weighting (docs/scale.md): fixed λ_i, Kendall's uncertainty, DWA, GradNorm, "
                          "PCGrad."),
        click.option("--weighting-lr", type=Number(min=0, min_open=True), default=None,
                     help="Learning rate of uncertainty's and gradnorm's weights (default: the network's)."),
        click.option("--gradnorm-alpha", type=Number(min=0), default=1.5, show_default=True,
                     help="GradNorm's α."),
        click.option("--dwa-temperature", type=Number(min=0, min_open=True), default=2.0, show_default=True,
                     help="DWA's temperature T."),
        click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Processes preparing batches (the batches are the same whatever the number)."),
        click.option("--sync-bn", is_flag=True,
                     help="Under torchrun: batch normalisation with the global batch's statistics (docs/scale.md)."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]):
        f = deco(f)
    return f


def _scale_options(kw: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Pop the weighting and loading options: (what a run records: nothing for the default equal
    weighting, so its config.json reads as before; only the constants its weighting reads), workers."""
    name = kw.pop("weighting", "equal")
    given = {"weighting_lr": kw.pop("weighting_lr", None), "gradnorm_alpha": kw.pop("gradnorm_alpha", 1.5),
             "dwa_temperature": kw.pop("dwa_temperature", 2.0)}
    reads = {"equal": (), "pcgrad": (), "uncertainty": ("weighting_lr",), "dwa": ("dwa_temperature",),
             "gradnorm": ("weighting_lr", "gradnorm_alpha")}[name]
    defaults = {"weighting_lr": None, "gradnorm_alpha": 1.5, "dwa_temperature": 2.0}
    for k, v in given.items():
        if k not in reads and v != defaults[k]:
            raise MtcError(f"--{k.replace('_', '-')} does not apply to --weighting {name}")
    out = {} if name == "equal" else {"weighting": name, **{k: given[k] for k in reads}}
    return out, int(kw.pop("workers", 0))


def _start_world(run_dir: str, device: str | None, sync_bn: bool) -> str:
    """Under torchrun: join the process group; the run directory this rank writes into (rank 0:
    RUN_DIR; the others: a private copy). Without torchrun: RUN_DIR, nothing else happens."""
    from mtc.train import distributed

    distributed.start(device or ("cuda" if _cuda() else "cpu"), sync_bn=sync_bn)
    return distributed.private_run_dir(run_dir)


def _world_record() -> dict[str, Any]:
    from mtc.train.distributed import current

    return current().record()


def _check_world(recorded: Any, run_dir: str) -> None:
    from mtc.train.distributed import check_resume

    check_resume(int(recorded or 1), source=run_dir)


@main.command("search", cls=PluginCommand, plugin_params=_strategy_params)
@click.argument("supergraph", type=click.Path(dir_okay=False))
@click.option("--data", "data", required=True, metavar="SPEC", help="scenes, relatedness, digits or pkg.module:factory[?k=v].")
@click.option("--run-dir", required=True, type=click.Path(file_okay=False), help="Where everything is written.")
@click.option("--strategy", default=None, metavar="NAME", help="Search strategy (default: the space's; see mtc "
              "compile --list-spaces).")
@click.option("--task-weights", default=None, metavar="t=w,..", help="λ_i per task (default 1).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir from its last checkpoint.")
@_run_options
def search_cmd(supergraph: str, data: str, run_dir: str, strategy: str | None, task_weights: str | None, seed: int,
               resume: bool, batch_size: int, checkpoint_every: int, device: str | None, amp: bool, quiet: bool,
               **kwargs: Any) -> None:
    """Search a supergraph's space: train its search form with a strategy and derive a plan (plan.json)."""
    import shutil

    from mtc.data import load_data
    from mtc.spaces import all_strategy_options, resolve_options, space_of_model
    from mtc.tasks.spec import tasks_of
    from mtc.train.run import SUPERGRAPH, RunDir, RunLock, differing, file_digest, session
    from mtc.train.search import finished_plan, run_search

    run_dir = _start_world(run_dir, device, kwargs.pop("sync_bn", False))
    run = RunDir(run_dir)
    model = _load_supergraph(supergraph)
    digest = file_digest(supergraph)
    space = space_of_model(model, file=supergraph)
    info = space.strategies.get(strategy or space.default_strategy)
    if info is None:
        space.strategy(strategy)  # raises with the list of strategies
        return
    scale, workers = _scale_options(kwargs)
    given = _given(kwargs, set(all_strategy_options()))
    strat_opts = resolve_options(info.options, given, what=f"strategy '{info.name}' of space '{space.name}'")
    tasks = tasks_of(model) or []
    options = {**strat_opts, "batch_size": batch_size, "checkpoint_every": checkpoint_every, "seed": seed,
               "amp": amp or False, "task_weights": _task_weights(task_weights, tasks), **scale}
    config = {"supergraph": SUPERGRAPH, "supergraph_sha256": digest, "data": data, "seed": seed,
              "space": space.name, "strategy": info.name, "search": options, **_world_record()}
    # A directory only belongs to a search once that search wrote a checkpoint: an attempt that
    # failed before one leaves nothing the next attempt has to live with.
    RunLock(run.path, "").probe()  # a live holder is named before its half-written files are read
    searched = run.has_checkpoint("search")
    if searched:
        cfg = run.config()
        if cfg.get("supergraph_sha256") != digest:
            raise MtcError("the run directory belongs to a different supergraph (use a new --run-dir)", file=run_dir)
        if not resume:
            raise MtcError("the run directory already holds a search: pass --resume to continue it, or use a new "
                           "--run-dir", file=run_dir)
        _check_world(cfg.get("world_size", 1), run_dir)
        changed = differing({"data": cfg.get("data"), "seed": cfg.get("seed"), "strategy": cfg.get("strategy"),
                             **cfg.get("search", {})},
                            {"data": data, "seed": seed, "strategy": info.name, **options})
        if changed:
            raise MtcError("--resume continues the run as it was configured; these options differ from its "
                           "config.json: " + "; ".join(changed), file=run_dir)
    dev = _device(device, amp)
    done = finished_plan(run, model) if resume and searched else None
    if done is not None:
        plan = done  # the options agree with config.json (checked above): nothing to continue
    else:
        train, val = load_data(data, tasks, _input_chw(model), seed)
        with session(run, what=f"mtc search {supergraph}", checkpoint="search"):
            if not searched:
                shutil.copyfile(supergraph, run.file(SUPERGRAPH))
                run.write_json("config.json", config)
            plan = run_search(run, model, train, val, {**options, "workers": workers}, strategy=info.name,
                              device=dev, resume=resume, progress=not quiet, data_spec=data)
    decided = sum(len(per) for per in plan.ops.values())
    firsts = sum(1 for c, per in plan.ops.items() for o in per.values() if o == _first_option(model, c))
    text = space.describe_plan(model, plan)  # the space's own view of the plan (a tree, say)
    if text:
        click.echo(text)
    click.echo(f"plan: {firsts}/{decided} task-choice decisions on the first option (shared); wrote "
               f"{run.file('plan.json')}")


def _first_option(model, choice: str) -> str:
    from mtc.ir import supergraph as sg

    for c in sg.choices_of(model, "op"):
        if c.name == choice:
            return c.options[0].name
    return ""


# ------------------------------------------------------------------------------------------- train
@main.command("train")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--steps", type=click.IntRange(min=0), default=400, show_default=True)
@click.option("--lr", type=Number(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--keep-weights", is_flag=True, help="Start from the searched weights instead of re-initialised ones.")
@click.option("--plan", "--policy", "plan_file", type=click.Path(dir_okay=False), default=None,
              help="A plan (or AutoMTL policy) JSON to train instead of the run's plan.json.")
@click.option("--baselines", type=click.Path(file_okay=False), default=None,
              help="A mtc baseline run directory: adds Δt_i and Δt (AutoMTL Eq. 5) to metrics.json.")
@click.option("--init-from-baselines", "init_from", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Start from the single-task models of a mtc baseline run, as the space maps them onto the plan "
                   "(branched: each group's copy of a block from one of its tasks' models).")
@click.option("--resume", is_flag=True)
@_run_options
def train_cmd(run_dir: str, steps: int, lr: float, keep_weights: bool, plan_file: str | None,
              baselines: str | None, resume: bool, batch_size: int, checkpoint_every: int, device: str | None,
              amp: str | None, quiet: bool, init_from: str | None = None, **kwargs: Any) -> None:
    """Post-train: train the plan's network (the derived multi-task model), then evaluate every task."""
    from mtc.data import load_data
    from mtc.export.api import read_plan
    from mtc.tasks.spec import tasks_of
    from mtc.train.posttrain import TrainOptions, run_train
    from mtc.train.run import PLAN, SUPERGRAPH, RunDir, RunLock, differing, module_tensors, session

    run_dir = _start_world(run_dir, device, kwargs.pop("sync_bn", False))
    run = RunDir(run_dir)
    RunLock(run.path, "").probe()
    cfg = run.config()
    model = _load_supergraph(str(run.file(str(cfg.get("supergraph", SUPERGRAPH)))))
    plan = read_plan(plan_file or run.file(PLAN), model)
    if not resume and run.has_checkpoint("train"):
        raise MtcError("the run directory already holds a trained model: pass --resume to continue", file=run_dir)
    tasks = tasks_of(model) or []
    seed = int(cfg.get("seed", 0))
    scale, workers = _scale_options(kwargs)
    base = RunDir(baselines).read_json("baselines.json") if baselines else None  # before any training
    recorded = {"steps": steps, "lr": lr, "batch_size": batch_size, "keep_weights": keep_weights,
                "init_from_baselines": init_from, "plan": str(plan_file or PLAN)}
    recorded.update(scale)
    recorded.update(_world_record())
    if amp:
        recorded["amp"] = amp
    if resume and run.has_checkpoint("train") and isinstance(cfg.get("train"), dict):
        _check_world(cfg["train"].get("world_size", 1), run_dir)
        changed = differing(cfg["train"], recorded)
        if changed:
            raise MtcError("--resume continues the training as it was configured; these options differ from its "
                           "config.json: " + "; ".join(changed), file=run_dir)
    train, val = load_data(cfg["data"], tasks, _input_chw(model), seed)
    searched = module_tensors(run.load_checkpoint("search")[0]) if keep_weights else None
    if init_from is not None:
        if keep_weights:
            raise MtcError("--init-from-baselines and --keep-weights exclude each other")
        from mtc.spaces import space_of_model

        searched = space_of_model(model).init_from_baselines(model, plan, init_from)
    opts = TrainOptions(steps=steps, batch_size=batch_size, lr=lr, checkpoint_every=checkpoint_every, seed=seed,
                        keep_weights=keep_weights or init_from is not None, amp=amp or False, data=str(cfg["data"]),
                        workers=workers, **scale)
    dev = _device(device, amp)
    with session(run, what=f"mtc train {run_dir}", checkpoint="train"):
        if not (resume and run.has_checkpoint("train")):
            run.write_json("config.json", {**cfg, "train": recorded})
        result = run_train(run, model, plan, train, val, opts, device=dev, resume=resume, progress=not quiet,
                           searched_state=searched)
    if base is not None:
        from mtc.tasks.kinds import delta_t, relative_performance

        kinds = {t.name: t.kind for t in tasks}
        try:
            rel = {t: relative_performance(m, base["single"][t]["tasks"][t], kinds[t])
                   for t, m in result["tasks"].items()}
        except (KeyError, TypeError) as e:
            raise MtcError(f"the baselines lack task {e}", file=baselines) from None
        result["delta_t_i"] = rel
        result["delta_t"] = delta_t(list(rel.values()))
        single = sum(base["single"][t]["params"] for t in rel)
        result["params_pct_of_single_task"] = 100.0 * result["params"] / single
    run.write_json("metrics.json", result)
    for t, m in result["tasks"].items():
        click.echo(f"{t}: " + ", ".join(f"{k}={v:.4g}" for k, v in m.items()))
    click.echo(f"parameters: {result['params']:,}; wrote {run.file('metrics.json')}")


@main.command("baseline")
@click.argument("model")
@click.option("--tasks", required=True, metavar="SPEC")
@click.option("--data", "data", required=True, metavar="SPEC")
@click.option("--run-dir", required=True, type=click.Path(file_okay=False))
@click.option("--steps", type=click.IntRange(min=0), default=400, show_default=True,
              help="The same budget as mtc train.")
@click.option("--lr", type=Number(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--head-width", type=click.IntRange(min=1, max=65536), default=256, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--input-shape", metavar="DIMS", default=None)
@click.option("--width", type=Number(min=0, max=1, min_open=True), default=None, metavar="R",
              help="Train only the hard-shared model, every prunable channel group slimmed to the first R of its "
                   "channels (a static model at a uniform width, e.g. MTL-Static against a slimmable supernet).")
@click.option("--round-to", "round_to", type=click.IntRange(min=1), default=1, show_default=True, metavar="K",
              help="With --width: kept channel counts are multiples of K.")
@_run_options
def baseline_cmd(model: str, tasks: str, data: str, run_dir: str, steps: int, lr: float, head_width: int, seed: int,
                 input_shape: str | None, width: float | None, round_to: int, batch_size: int, checkpoint_every: int,
                 device: str | None, amp: str | None, quiet: bool, **kwargs: Any) -> None:
    """Train the single-task models and the hard-shared multi-task model (the Δt reference); with
    --width R, only the hard-shared model, uniformly slimmed."""
    from mtc.data import load_data
    from mtc.frontends import import_model, parse_input_shape
    from mtc.tasks import parse_tasks
    from mtc.train.baseline import run_baselines
    from mtc.train.posttrain import TrainOptions
    from mtc.train.run import RunDir, session

    scale, workers = _scale_options(kwargs)
    task_list = parse_tasks(tasks)
    shape = parse_input_shape(input_shape)
    probe = import_model(model, input_shape=shape)
    train, val = load_data(data, task_list, _input_chw(probe), seed)
    run_dir = _start_world(run_dir, device, kwargs.pop("sync_bn", False))
    run = RunDir(run_dir)
    if run.file("baselines.json").exists():
        raise MtcError("the run directory already holds baselines (use a new --run-dir)", file=run_dir)
    opts = TrainOptions(steps=steps, batch_size=batch_size, lr=lr, seed=seed, checkpoint_every=checkpoint_every,
                        amp=amp or False, data=data, workers=workers, **scale)
    dev = _device(device, amp)
    with session(run, what=f"mtc baseline {model}", checkpoint="train"):
        out = run_baselines(model, task_list, train, val, run, opts, input_shape=shape, head_width=head_width,
                            device=dev, progress=not quiet, width=width, round_to=round_to)
    if width is not None:
        click.echo(f"hard-shared at width {width:g}: {out['multi']['params']:,} params, {out['multi']['macs']:,} "
                   f"MACs; wrote {run.file('baselines.json')}")
        return
    click.echo(f"hard-shared: {out['multi']['params']:,} params; single-task: "
               + ", ".join(f"{t} {r['params']:,}" for t, r in out["single"].items())
               + f"; wrote {run.file('baselines.json')}")


@main.command("report")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", default="report", show_default=True, help="Writes OUT.md and OUT.json.")
def report_cmd(dirs: tuple[str, ...], out: str) -> None:
    """Tables 2/3 of AutoMTL: params in % of the single-task models, every metric, Δt_i and Δt."""
    from mtc.ir.io import atomic_write
    from mtc.train.report import build_report, to_markdown

    rep = build_report(list(dirs))
    md = to_markdown(rep)
    with atomic_write(out + ".md") as f:
        f.write(md)
    with atomic_write(out + ".json") as f:
        json.dump(rep, f, indent=2)
        f.write("\n")
    click.echo(md)
    click.echo(f"wrote {out}.md and {out}.json")


# ------------------------------------------------------------------------------------------ export
def _export_params() -> list[click.Parameter]:
    from mtc.spaces import all_export_options

    return [_plugin_option(name, [(sp, o) for sp, o in decls], "space")
            for name, decls in sorted(all_export_options().items())]


def _space_export(source: str, given: dict[str, Any], plan_file: str | None, weights_file: str | None,
                  fold_bn: bool, resize_matmul: bool) -> tuple[Any, Any]:
    """The run's inputs with the plan and weights its space's export options choose (the space's hook)."""
    from mtc.export.api import RunInputs, export_graphs
    from mtc.ir import io
    from mtc.ir import supergraph as sg
    from mtc.spaces import resolve_options, space_of_model
    from mtc.train.run import SUPERGRAPH, RunDir

    flags = ", ".join("--" + k.replace("_", "-") for k in given)
    if plan_file is not None or weights_file is not None:
        raise MtcError(f"{flags} choose the plan and weights: they exclude --plan and --weights")
    if not Path(source).is_dir():
        raise MtcError(f"{flags} need a run directory as SOURCE", file=source)
    run = RunDir(source)
    sg_path = run.file(str(run.config().get("supergraph", SUPERGRAPH)))
    model = io.load(sg_path)
    sg.check_format(model, file=str(sg_path))
    sp = space_of_model(model, file=str(sg_path))
    own = {o.name for o in sp.export_options}
    for k in given:
        if k not in own:
            raise MtcError(f"--{k.replace('_', '-')} does not apply to space '{sp.name}'")
    opts = resolve_options(sp.export_options, given, what=f"mtc export for space '{sp.name}'")

    def deployed(plan: Any) -> Any:
        return export_graphs(model, plan, None, tasks=[], fused=True, fold_bn=fold_bn,
                             resize_matmul=resize_matmul).fused

    choice = sp.export_choice(run, model, opts, device="cpu", deployed=deployed)
    inputs = RunInputs(model=model, plan=choice.plan, weights=choice.weights, supergraph_path=str(sg_path),
                       run_dir=source)
    return inputs, choice


@main.command("export", cls=PluginCommand, plugin_params=_export_params)
@click.argument("source", type=click.Path())
@click.option("-o", "--out", "out", required=True, type=click.Path(),
              help="A .onnx file when exactly one model is exported, otherwise a folder: <task>.onnx per task "
                   "and fused.onnx.")
@click.option("--task", "tasks", multiple=True, metavar="T", help="Export this task's model (repeatable).")
@click.option("--all", "all_tasks", is_flag=True, help="Export every task's model.")
@click.option("--fused/--no-fused", default=None,
              help="Export the fused model of all tasks (alone: only it). With no --task/--all/--fused, every "
                   "task and the fused model are exported; --no-fused drops the fused model.")
@click.option("--fold-bn", is_flag=True, help="Fold BatchNormalization into the preceding Conv.")
@click.option("--resize-matmul/--keep-resize", default=True, show_default=True,
              help="Rewrite linear Resize as two MatMuls with interpolation matrices: exact, and several times "
                   "faster in onnxruntime (docs/export.md).")
@click.option("--plan", "--policy", "plan_file", type=click.Path(dir_okay=False), default=None,
              help="The plan (or AutoMTL policy) JSON: required for a supergraph SOURCE; for a run directory, "
                   "instead of its plan.json (it must be the one trained).")
@click.option("--weights", "weights_file", type=click.Path(dir_okay=False), default=None,
              help="Trained weights (an mtc train checkpoint, or a safetensors file keyed by IR names): for a "
                   "supergraph SOURCE (default: its initial weights), or instead of a run's final checkpoint.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="onnxruntime execution provider for verification and the report.")
@click.option("--report/--no-report", default=True, show_default=True,
              help="Measure and print the deployment report (report.json in the folder, or <stem>.report.json "
                   "beside a single file).")
@click.option("--repeat", type=click.IntRange(min=1), default=30, show_default=True,
              help="Timed runs per model in the report.")
def export_cmd(source: str, out: str, tasks: tuple[str, ...], all_tasks: bool, fused: bool | None, fold_bn: bool,
               resize_matmul: bool, plan_file: str | None, weights_file: str | None, provider: str, report: bool,
               repeat: int, **kwargs: Any) -> None:
    """Export SOURCE (a trained run directory, or a supergraph file with --plan) to ONNX: per-task
    pruned models and/or the fused one, each verified in onnxruntime before it is written. A run's
    space may choose the plan and weights from its own options (the slimmable space: --budget,
    --preference, --widths)."""
    from mtc.export.api import (
        VerificationError,
        export_graphs,
        load_source,
        plan_outputs,
        providers,
        write_verified,
    )
    from mtc.spaces import all_export_options

    providers(provider)  # a clear message before any work when CUDA is unavailable
    given = _given(kwargs, set(all_export_options()))
    choice = None
    if given:
        inputs, choice = _space_export(source, given, plan_file, weights_file, fold_bn, resize_matmul)
    else:
        inputs = load_source(source, plan_file=plan_file, weights_file=weights_file)
    outs = plan_outputs(inputs.model, out, tasks=tasks, all_tasks=all_tasks, fused=fused)
    for p in outs.paths.values():
        _refuse_overwrite(p, inputs.supergraph_path, inputs.weights_path, plan_file)
    origin = inputs.origin()
    if choice is not None:
        origin["choice"] = {k: v for k, v in choice.info.items() if k != "summary"}
    ex = export_graphs(inputs.model, inputs.plan, inputs.weights, tasks=outs.tasks, fused=outs.fused,
                       fold_bn=fold_bn, resize_matmul=resize_matmul, weights_source=inputs.weights_path,
                       origin=origin)
    if inputs.weights is None:
        click.echo("mtc: note: no --weights: exporting the supergraph's initial (untrained) weights", err=True)
    try:
        written = write_verified(ex, outs.paths, provider=provider)
    except VerificationError as e:
        click.echo(f"mtc: verification failed: {e}; no file written", err=True)
        sys.exit(VerificationError.exit_code)
    for r in written.values():
        worst = max(r["diff"].values()) if r["diff"] else 0.0
        click.echo(f"{r['path']}: verified against the lowering (max relative difference {worst:.2g})")
    info = choice.info if choice is not None else {}
    for line in info.get("summary", []):
        click.echo(line)
    if report:
        from mtc.export.report import deployment_report, print_report

        extra = {"choice": {k: v for k, v in info.items() if k != "summary"}} if info else None
        rep = deployment_report(inputs.model, ex, path=outs.report, provider=provider, repeat=repeat, extra=extra)
        click.echo(print_report(rep))
        if "budget_macs" in info and rep.get("fused") is not None:
            f = rep["fused"]
            click.echo(f"budget asked {human(info['budget_macs'])} MACs; delivered {human(f['macs'])} MACs "
                       f"({f['macs']:,}; fused model, {f['latency_ms']:.3f} ms median)")
        click.echo(f"wrote {rep['path']}")
    if "budget_macs" in info and (not report or rep.get("fused") is None):
        click.echo(f"budget asked {human(info['budget_macs'])} MACs; the fused model costs "
                   f"{human(info['predicted_macs'])} MACs (cost model)")


# ------------------------------------------------------------------------------------------- prune
@main.command("prune")
@click.argument("model")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="The pruned .onnx file.")
@click.option("--ratio", type=float, default=None, metavar="R",  # range (and NaN) checked by the pruning API
              help="Remove this fraction of every prunable group's channels, 0 < R < 1.")
@click.option("--keep", "keep", default=None, metavar="GROUP=N,...",
              help="Keep N channels of GROUP (a name or id from mtc inspect --channels); wins over --ratio.")
@click.option("--importance", type=click.Choice(["l1", "l2", "random"]), default="l1", show_default=True,
              help="Which channels to keep: largest L1 or L2 norm of the producers' weights, or random (--seed).")
@click.option("--round-to", "round_to", type=int, default=1, show_default=True, metavar="K",
              help="With --ratio: kept counts are multiples of K (a group smaller than K is kept whole).")
@click.option("--ignore", default=None, metavar="NODE,...", help="Leave the groups that touch these nodes whole.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="onnxruntime execution provider for verification and the report.")
@click.option("--report/--no-report", default=True, show_default=True, help="Measure and print the report.")
@click.option("--repeat", type=click.IntRange(min=1), default=30, show_default=True, help="Timed runs per model in the report.")
@_frontend_options
def prune_cmd(model: str, out: str, ratio: float | None, keep: str | None, importance: str, round_to: int,
              ignore: str | None, provider: str, report: bool, repeat: int, input_shape: str | None,
              opset: int | None, exporter: str, seed: int) -> None:
    """Remove channels for real: a smaller ONNX model, verified in onnxruntime against the original with
    the removed channels' consumer weights zeroed before it is written (docs/channels.md). --seed also
    seeds random importance and the verification input."""
    from mtc.export.api import VerificationError, providers
    from mtc.export.prune import (
        parse_ignore,
        parse_keep,
        print_prune_report,
        prune_model,
        prune_report,
        write_pruned,
    )

    keep_counts = parse_keep(keep)
    if ratio is None and not keep_counts:
        raise MtcError("give --ratio R or --keep GROUP=N,...")
    providers(provider)
    m = _import(model, input_shape, opset, exporter, seed)
    res = prune_model(m, ratio=ratio, keep=keep_counts, importance=importance, round_to=round_to,
                      ignore=parse_ignore(ignore), seed=seed)
    try:
        dst, diffs = write_pruned(res, out, provider=provider, seed=seed)
    except VerificationError as e:
        click.echo(f"mtc: verification failed: {e}; no file written", err=True)
        sys.exit(VerificationError.exit_code)
    worst = max(diffs.values()) if diffs else 0.0
    click.echo(f"{dst}: verified against the zeroed-consumer reference (max relative difference {worst:.2g})")
    if report:
        click.echo(print_prune_report(prune_report(res, provider=provider, repeat=repeat)))


# ------------------------------------------------------------------------------------------ verify
def _load_inputs(specs: tuple[str, ...], names: list[str]) -> list[Any] | None:
    """``--input x.npy`` in graph-input order, or ``--input NAME=x.npy``."""
    import numpy as np

    if not specs:
        return None
    by_name: dict[str, Any] = {}
    positional: list[Any] = []
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


@main.command("verify")
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--input", "input_specs", multiple=True, metavar="[NAME=]FILE.npy",
              help="Input array (.npy), repeated per graph input; random (seeded) by default.")
@click.option("--atol", type=Number(min=0), default=None, help="Absolute tolerance (default 1e-5).")
@click.option("--rtol", type=Number(min=0), default=None,
              help="Tolerance relative to each output's scale (max |onnxruntime output|; default 1e-4).")
@click.option("--compile", "use_compile", is_flag=True, help="Also check the module under torch.compile.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--against", "against", type=click.Path(file_okay=False), default=None, metavar="RUN_DIR",
              help="Check an exported model against the run's plan lowering (as mtc export does).")
@click.option("--task", "task", default=None, metavar="T", help="With --against: compare only this task's output.")
def verify_cmd(model_path: str, input_specs: tuple[str, ...], atol: float | None, rtol: float | None,
               use_compile: bool, seed: int, against: str | None = None, task: str | None = None) -> None:
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
    from mtc.lower.verify import DEFAULT_ATOL, DEFAULT_RTOL, _user_inputs, verify

    atol = DEFAULT_ATOL if atol is None else atol
    rtol = DEFAULT_RTOL if rtol is None else rtol
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


def _device(device: str | None, amp: str | bool | None) -> str:
    """The torch device: CUDA when present unless told otherwise; --amp fp16 needs CUDA, --amp bf16 a
    device with bfloat16 support."""
    import torch

    dev = device or ("cuda" if _cuda() else "cpu")
    if dev == "cuda" and not _cuda():
        raise MtcError("--device cuda: no CUDA device is available")
    if amp == "fp16" and dev != "cuda":
        raise MtcError("--amp fp16 needs a CUDA device (float16 with a gradient scaler); on the CPU use --amp bf16")
    if amp and amp != "fp16":
        if dev == "cuda" and not torch.cuda.is_bf16_supported():
            raise MtcError("--amp bf16: this CUDA device has no bfloat16 support; use --amp fp16")
        if dev == "cpu" and not torch.amp.autocast_mode.is_autocast_available("cpu"):
            raise MtcError("--amp bf16: this torch has no CPU autocast")
    from mtc.train.distributed import current

    return current().device(dev)  # under torchrun on CUDA: this rank's GPU


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def run() -> None:
    """The ``mtc`` program: the working directory is not an import path (``python -m`` puts it first,
    so a ``matplotlib.py`` or ``torch.py`` there would replace the libraries mtc imports later)."""
    cwd = os.getcwd()
    sys.path[:] = [p for p in sys.path if p not in ("", ".", cwd)]
    main(prog_name="mtc")


if __name__ == "__main__":  # pragma: no cover
    run()
