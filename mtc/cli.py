"""The ``mtc`` command line."""

from __future__ import annotations

import json
import sys
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


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}" if unit else f"{int(n)}"
        n /= 1000
    return f"{n:.3g}P"


@click.group(cls=MtcGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mtc")
def main() -> None:
    """mtc: compile a single-task CNN backbone into a multi-task model."""


_input_shape = click.option(
    "--input-shape", metavar="DIMS", default=None,
    help="Input shape, e.g. 1,3,224,224 (required for PyTorch sources and symbolic spatial sizes).",
)
_opset = click.option("--opset", type=int, default=None, help="Target ONNX opset (17 or newer; default 18).")
_exporter = click.option(
    "--exporter", type=click.Choice(["dynamo", "torchscript"]), default="dynamo", show_default=True,
    help="torch.onnx exporter for PyTorch sources.",
)
_seed = click.option("--seed", type=int, default=0, show_default=True, help="Seed of prototxt weight fillers.")


def _import(src: str, input_shape: str | None, opset: int | None, exporter: str, seed: int):
    from mtc.frontends import import_model, parse_input_shape
    from mtc.ir.opset import TARGET_OPSET

    return import_model(
        src, input_shape=parse_input_shape(input_shape), opset=opset or TARGET_OPSET, exporter=exporter, seed=seed
    )


@main.command("import")
@click.argument("src")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), default=None,
              help="Output .onnx file (default: SRC's stem + .onnx in the working directory).")
@_input_shape
@_opset
@_exporter
@_seed
def import_cmd(src: str, out: str | None, input_shape: str | None, opset: int | None, exporter: str, seed: int) -> None:
    """Import a backbone (.onnx, .prototxt, or pkg.module:factory) into the mtc IR as ONNX."""
    from mtc.frontends import default_output
    from mtc.ir import io
    from mtc.ir.cost import model_cost

    model = _import(src, input_shape, opset, exporter, seed)
    dst = io.save(model, out or default_output(src))
    params, macs, _ = model_cost(model)
    click.echo(f"wrote {dst}: {len(list(model.graph))} nodes, {_human(params)} params, {_human(macs)} MACs")


@main.command("inspect")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON (keys in docs/inspect.md).")
@click.option("--top", type=int, default=10, show_default=True, help="How many of the heaviest nodes to list.")
@click.option("--channels", is_flag=True,
              help="List the channel dependency groups instead: id, size, members, prunable or why not "
                   "(docs/channels.md).")
@_input_shape
@_opset
@_exporter
@_seed
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
        s["supergraph"] = sg.summarize_supergraph(m)
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
        if sg.is_supergraph(m):
            return m
    return _import(src, input_shape, opset, exporter, seed)


def _print_supergraph(sup: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    tasks = ", ".join(f"{t['name']}:{t['kind']}:{t['channels']}" for t in sup["tasks"])
    ss = sup["search_space"]
    con.print(f"[bold]supergraph[/bold]: tasks {tasks}; {sup['vcns']} VCNs; search space 3^{ss['choices']} "
              f"≈ 10^{ss['log10_size']} policies")
    p = sup["params"]
    t = Table(title="Parameters by part")
    for col in ("shared", "task-specific copies", "skips", "heads"):
        t.add_column(col, justify="right")
    t.add_row(f"{p['shared']:,}", f"{p['specific']:,}", f"{p['skip']:,}", f"{p['heads']:,}")
    con.print(t)
    m = Table(title="MACs per sample")
    m.add_column("task")
    m.add_column("all shared", justify="right")
    m.add_column("all task-specific", justify="right")
    for name, v in sup["macs"]["per_task"].items():
        m.add_row(name, f"{v['all_shared']:,}", f"{v['all_specific']:,}")
    tot = sup["macs"]["total"]
    m.add_row("[bold]all tasks[/bold]", f"{tot['all_shared']:,}", f"{tot['all_specific']:,}")
    con.print(m)


def _print_summary(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"[bold]{s['source']}[/bold]  graph '{s['graph']}', opset {s['opset']}, {s['nodes']} nodes, "
              f"{_human(s['params'])} params ({s['params']:,}), {_human(s['macs'])} MACs ({s['macs']:,})")
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


@main.command("compile")
@click.argument("model")
@click.option("--tasks", "tasks", required=True, metavar="SPEC",
              help="Tasks as name[:kind][:channels], comma-separated, e.g. seg:seg:13,depth:depth:1.")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), default=None,
              help="Output supergraph (default: MODEL's stem + .mtc.onnx).")
@click.option("--feature", default=None, metavar="TENSOR", help="Tensor the heads attach to (default: found).")
@click.option("--head-width", type=int, default=256, show_default=True, help="ASPP head width (AutoMTL: 1024).")
@click.option("--per-task-norm", is_flag=True,
              help="AutoMTL's per-task normalisation in every option (see docs/supergraph.md).")
@click.option("--passes", default=None, metavar="A,B,..", help="Pass pipeline (default: the full compile).")
@click.option("--dump-after", "dump_after", multiple=True, metavar="PASS", help="Dump the graph after PASS.")
@click.option("--dump-dir", type=click.Path(file_okay=False), default=None,
              help="Directory for ONNX-text dumps (default: OUTPUT's stem + .dump when --dump-after is given).")
@_input_shape
@_opset
@_exporter
@_seed
def compile_cmd(model: str, tasks: str, out: str | None, feature: str | None, head_width: int, per_task_norm: bool,
                passes: str | None, dump_after: tuple[str, ...], dump_dir: str | None, input_shape: str | None,
                opset: int | None, exporter: str, seed: int) -> None:
    """Compile a backbone and a task list into a multi-task supergraph (.mtc.onnx)."""
    import time
    from pathlib import Path

    from mtc.frontends import default_output
    from mtc.ir import io
    from mtc.passes.pipeline import DEFAULT_PIPELINE, compile_supergraph
    from mtc.tasks import parse_tasks

    task_list = parse_tasks(tasks)  # fail on a bad spec before any import work
    dst = Path(out) if out else Path(default_output(model).stem + ".mtc.onnx")
    t0 = time.perf_counter()
    m = _import(model, input_shape, opset, exporter, seed)
    t_import = time.perf_counter() - t0
    if dump_after and dump_dir is None:
        dump_dir = str(dst.with_suffix("").with_suffix("")) + ".dump"
    res = compile_supergraph(m, tasks=task_list, feature=feature, head_width=head_width,
                             per_task_norm=per_task_norm, seed=seed, passes=passes or DEFAULT_PIPELINE,
                             dump_dir=dump_dir, dump_after=dump_after)
    click.echo(f"{'import':<16}{t_import * 1000:9.1f} ms")
    for r in res.records:
        click.echo(f"{r.name:<16}{r.seconds * 1000:9.1f} ms  {'modified' if r.modified else 'unchanged':<9}"
                   f"  {r.nodes} nodes")
    t1 = time.perf_counter()
    io.save(res.model, dst)
    click.echo(f"{'save':<16}{(time.perf_counter() - t1) * 1000:9.1f} ms")
    click.echo(f"wrote {dst}")


@main.command("check")
@click.argument("model")
@click.option("--golden", required=True, type=click.Path(dir_okay=False), metavar="FILE.json",
              help="Golden snapshot to compare with (keys in docs/check.md).")
@click.option("--update", is_flag=True, help="Write or overwrite the golden with MODEL's snapshot.")
@click.option("--tasks", "tasks", default=None, metavar="SPEC",
              help="Compile MODEL (a backbone) for these tasks first, e.g. seg,depth.")
@click.option("--feature", default=None, metavar="TENSOR", help="With --tasks: tensor the heads attach to.")
@click.option("--head-width", type=int, default=None, help="With --tasks: ASPP head width (default 256).")
@click.option("--per-task-norm", is_flag=True, help="With --tasks: AutoMTL's per-task normalisation.")
@_input_shape
@_opset
@_exporter
@_seed
def check_cmd(model: str, golden: str, update: bool, tasks: str | None, feature: str | None,
              head_width: int | None, per_task_norm: bool, input_shape: str | None, opset: int | None,
              exporter: str, seed: int) -> None:
    """Compare MODEL's graph snapshot with a golden JSON file: exit 0 if equal, 1 with a diff if not.

    MODEL is a compiled supergraph (.mtc.onnx), a plain model, or, with --tasks, a backbone that is
    compiled in memory first.
    """
    from pathlib import Path

    from mtc import check as chk

    if tasks is None and (feature is not None or head_width is not None or per_task_norm):
        raise MtcError("--feature, --head-width and --per-task-norm only apply with --tasks")
    dst = Path(golden)
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
                       per_task_norm=per_task_norm, seed=seed, input_shape=input_shape, opset=opset,
                       exporter=exporter)
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


def _load_supergraph(path: str):
    from mtc.ir import io
    from mtc.ir import supergraph as sg

    m = io.load(path)
    if not sg.is_supergraph(m):
        raise MtcError("not a supergraph: compile the backbone first (mtc compile --tasks ...)", file=path)
    return m


def _input_chw(model) -> tuple[int, int, int]:
    dims = list(model.graph.inputs[0].shape)
    return tuple(int(d) for d in dims[1:])  # type: ignore[return-value]


def _task_weights(text: str | None, tasks) -> dict[str, float] | None:
    if not text:
        return None
    out: dict[str, float] = {}
    names = {t.name for t in tasks}
    for item in text.split(","):
        name, _, val = item.partition("=")
        if name.strip() not in names:
            raise MtcError(f"--task-weights: '{name.strip()}' is not a task ({', '.join(sorted(names))})")
        try:
            out[name.strip()] = float(val)
        except ValueError:
            raise MtcError(f"--task-weights: '{item}' needs a number, e.g. seg=5") from None
    return out


@main.command("search")
@click.argument("supergraph", type=click.Path(dir_okay=False))
@click.option("--data", "data", required=True, metavar="SPEC", help="scenes, relatedness, digits or pkg.module:factory[?k=v].")
@click.option("--run-dir", required=True, type=click.Path(file_okay=False), help="Where everything is written.")
@click.option("--pretrain-steps", type=int, default=200, show_default=True)
@click.option("--policy-steps", type=int, default=400, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--weight-lr", type=float, default=1e-3, show_default=True, help="AutoMTL Table 1.")
@click.option("--policy-lr", type=float, default=1e-2, show_default=True, help="AutoMTL Table 1.")
@click.option("--lambda-reg", type=float, default=1e-3, show_default=True,
              help="Weight of Eq. 3 (Table 1, NYUv2 row), for the paper's ~4,000 policy updates.")
@click.option("--lambda-reg-scaling", type=click.Choice(["budget", "none"]), default="budget", show_default=True,
              help="budget: use λ_reg · 4000 / policy-steps, the same total pull as the paper's; none: as given.")
@click.option("--task-weights", default=None, metavar="t=w,..", help="λ_i per task (default 1).")
@click.option("--tau0", type=float, default=5.0, show_default=True, help="Initial Gumbel temperature.")
@click.option("--hard", is_flag=True, help="Straight-through one-hot Gumbel samples.")
@click.option("--sample", type=int, default=0, show_default=True,
              help="Draw K policies and keep the best on validation (default: the most probable policy).")
@click.option("--checkpoint-every", type=int, default=50, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: cuda when present.")
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir from its last checkpoint.")
@click.option("--amp", is_flag=True, help="bfloat16 autocast (CUDA only).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def search_cmd(supergraph: str, data: str, run_dir: str, pretrain_steps: int, policy_steps: int, batch_size: int,
               weight_lr: float, policy_lr: float, lambda_reg: float, lambda_reg_scaling: str,
               task_weights: str | None, tau0: float,
               hard: bool, sample: int, checkpoint_every: int, seed: int, device: str | None, resume: bool,
               amp: bool, quiet: bool) -> None:
    """AutoMTL search: pre-train the supergraph, then train weights and policy alternately."""
    import shutil
    from dataclasses import asdict

    from mtc.data import load_data
    from mtc.ir import supergraph as sg
    from mtc.search.automtl import SearchOptions, run_search
    from mtc.train.run import SUPERGRAPH, RunDir, file_digest

    run = RunDir(run_dir)
    model = _load_supergraph(supergraph)
    digest = file_digest(supergraph)
    if run.file("config.json").exists():
        cfg = run.config()
        if cfg.get("supergraph_sha256") != digest:
            raise MtcError("the run directory belongs to a different supergraph (use a new --run-dir)", file=run_dir)
        if not resume and run.has_checkpoint("search"):
            raise MtcError("the run directory already holds a search: pass --resume to continue it, or use a new "
                           "--run-dir", file=run_dir)
    tasks = sg.tasks_of(model) or []
    opts = SearchOptions(pretrain_steps=pretrain_steps, policy_steps=policy_steps, batch_size=batch_size,
                         weight_lr=weight_lr, policy_lr=policy_lr, lambda_reg=lambda_reg,
                         lambda_reg_scaling=lambda_reg_scaling,
                         task_weights=_task_weights(task_weights, tasks), tau0=tau0, hard=hard, sample=sample,
                         checkpoint_every=checkpoint_every, seed=seed, amp=amp)
    dev = _device(device, amp)
    train, val = load_data(data, tasks, _input_chw(model), seed)
    if not run.file("config.json").exists():
        run.path.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(supergraph, run.file(SUPERGRAPH))
        run.write_json("config.json", {"supergraph": SUPERGRAPH, "supergraph_sha256": digest, "data": data,
                                       "seed": seed, "search": asdict(opts)})
    policy = run_search(run, model, train, val, opts, device=dev, resume=resume, progress=not quiet)
    shared = sum(1 for per in policy.choices.values() for c in per.values() if c == 0)
    total = sum(len(per) for per in policy.choices.values())
    click.echo(f"policy: {shared}/{total} task-VCN choices shared; wrote {run.file('policy.json')}, "
               f"{run.file('policy.png')}, {run.file('task_correlation.json')}")


@main.command("train")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--steps", type=int, default=400, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--keep-weights", is_flag=True, help="Start from the searched weights instead of re-initialised ones.")
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False), default=None,
              help="A policy JSON to train instead of the run's policy.json.")
@click.option("--checkpoint-every", type=int, default=50, show_default=True)
@click.option("--baselines", type=click.Path(file_okay=False), default=None,
              help="A mtc baseline run directory: adds Δt_i and Δt (AutoMTL Eq. 5) to metrics.json.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None)
@click.option("--resume", is_flag=True)
@click.option("--amp", is_flag=True, help="bfloat16 autocast (CUDA only).")
@click.option("--quiet", is_flag=True)
def train_cmd(run_dir: str, steps: int, batch_size: int, lr: float, keep_weights: bool, policy_file: str | None,
              checkpoint_every: int, baselines: str | None, device: str | None, resume: bool, amp: bool,
              quiet: bool) -> None:
    """AutoMTL post-train: train the derived model with its policy fixed, then evaluate every task."""
    import json

    from mtc.data import load_data
    from mtc.ir import supergraph as sg
    from mtc.train.posttrain import TrainOptions, run_train
    from mtc.train.run import SUPERGRAPH, RunDir

    run = RunDir(run_dir)
    cfg = run.config()
    model = _load_supergraph(str(run.file(cfg.get("supergraph", SUPERGRAPH))))
    if policy_file:
        try:
            raw = json.loads(open(policy_file).read())
        except (OSError, json.JSONDecodeError) as e:
            raise MtcError(f"cannot read the policy: {e}", file=policy_file) from None
        src = policy_file
    else:
        raw = run.read_json("policy.json")
        src = str(run.file("policy.json"))
    policy = sg.Policy.from_json(raw.get("policy", raw) if isinstance(raw, dict) else raw, source=src)
    policy.validate(model, source=src)
    if not resume and run.has_checkpoint("train"):
        raise MtcError("the run directory already holds a trained model: pass --resume to continue", file=run_dir)
    tasks = sg.tasks_of(model) or []
    seed = int(cfg.get("seed", 0))
    train, val = load_data(cfg["data"], tasks, _input_chw(model), seed)
    searched = run.load_checkpoint("search")["module"] if keep_weights else None
    opts = TrainOptions(steps=steps, batch_size=batch_size, lr=lr, checkpoint_every=checkpoint_every, seed=seed,
                        keep_weights=keep_weights, amp=amp)
    dev = _device(device, amp)
    result = run_train(run, model, policy, train, val, opts, device=dev, resume=resume, progress=not quiet,
                       searched_state=searched)
    if baselines:
        from mtc.tasks.kinds import delta_t, relative_performance

        base = RunDir(baselines).read_json("baselines.json")
        kinds = {t.name: t.kind for t in tasks}
        try:
            rel = {t: relative_performance(m, base["single"][t]["tasks"][t], kinds[t])
                   for t, m in result["tasks"].items()}
        except KeyError as e:
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
@click.option("--steps", type=int, default=400, show_default=True, help="The same budget as mtc train.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--head-width", type=int, default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None)
@click.option("--quiet", is_flag=True)
@_input_shape
def baseline_cmd(model: str, tasks: str, data: str, run_dir: str, steps: int, batch_size: int, lr: float,
                 head_width: int, seed: int, device: str | None, quiet: bool, input_shape: str | None) -> None:
    """Train the single-task models and the hard-shared multi-task model (the Δt reference)."""
    from mtc.data import load_data
    from mtc.frontends import import_model, parse_input_shape
    from mtc.tasks import parse_tasks
    from mtc.train.baseline import run_baselines
    from mtc.train.posttrain import TrainOptions
    from mtc.train.run import RunDir

    task_list = parse_tasks(tasks)
    shape = parse_input_shape(input_shape)
    probe = import_model(model, input_shape=shape)
    train, val = load_data(data, task_list, _input_chw(probe), seed)
    run = RunDir(run_dir)
    if run.file("baselines.json").exists():
        raise MtcError("the run directory already holds baselines (use a new --run-dir)", file=run_dir)
    opts = TrainOptions(steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    out = run_baselines(model, task_list, train, val, run, opts, input_shape=shape, head_width=head_width,
                        device=device or ("cuda" if _cuda() else "cpu"), progress=not quiet)
    click.echo(f"hard-shared: {out['multi']['params']:,} params; single-task: "
               + ", ".join(f"{t} {r['params']:,}" for t, r in out["single"].items())
               + f"; wrote {run.file('baselines.json')}")


@main.command("report")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", default="report", show_default=True, help="Writes OUT.md and OUT.json.")
def report_cmd(dirs: tuple[str, ...], out: str) -> None:
    """Tables 2/3 of AutoMTL: params in % of the single-task models, every metric, Δt_i and Δt."""
    import json

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


@main.command("export")
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
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False), default=None,
              help="The policy JSON: required for a supergraph SOURCE; for a run directory, instead of its "
                   "policy.json (it must be the one trained).")
@click.option("--weights", "weights_file", type=click.Path(dir_okay=False), default=None,
              help="Trained weights (an mtc train checkpoint or a torch.save'd state dict of the fixed-policy "
                   "lowering): for a supergraph SOURCE (default: its initial weights), or instead of a run's "
                   "checkpoints/train.pt.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="onnxruntime execution provider for verification and the report.")
@click.option("--report/--no-report", default=True, show_default=True,
              help="Measure and print the deployment report (report.json in the folder, or <stem>.report.json "
                   "beside a single file).")
@click.option("--repeat", type=int, default=30, show_default=True, help="Timed runs per model in the report.")
def export_cmd(source: str, out: str, tasks: tuple[str, ...], all_tasks: bool, fused: bool | None, fold_bn: bool,
               resize_matmul: bool, policy_file: str | None, weights_file: str | None, provider: str, report: bool, repeat: int) -> None:
    """Export SOURCE (a trained run directory, or a supergraph file with --policy) to ONNX: per-task
    pruned models and/or the fused one, each verified in onnxruntime before it is written."""
    from mtc.export.api import (
        VerificationError,
        export_graphs,
        load_source,
        plan_outputs,
        providers,
        write_verified,
    )

    providers(provider)  # a clear message before any work when CUDA is unavailable
    inputs = load_source(source, policy_file=policy_file, weights_file=weights_file)
    plan = plan_outputs(inputs.model, out, tasks=tasks, all_tasks=all_tasks, fused=fused)
    ex = export_graphs(inputs.model, inputs.policy, inputs.weights, tasks=plan.tasks, fused=plan.fused,
                       fold_bn=fold_bn, resize_matmul=resize_matmul, weights_source=inputs.weights_path)
    if inputs.weights is None:
        click.echo("mtc: note: no --weights: exporting the supergraph's initial (untrained) weights", err=True)
    try:
        written = write_verified(ex, plan.paths, provider=provider)
    except VerificationError as e:
        click.echo(f"mtc: verification failed: {e}; no file written", err=True)
        sys.exit(VerificationError.exit_code)
    for r in written.values():
        worst = max(r["diff"].values()) if r["diff"] else 0.0
        click.echo(f"{r['path']}: verified against the lowering (max relative difference {worst:.2g})")
    if report:
        from mtc.export.report import deployment_report, print_report

        rep = deployment_report(inputs.model, ex, path=plan.report, provider=provider, repeat=repeat)
        click.echo(print_report(rep))
        click.echo(f"wrote {rep['path']}")


@main.command("prune")
@click.argument("model")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="The pruned .onnx file.")
@click.option("--ratio", type=float, default=None, metavar="R",
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
@click.option("--repeat", type=int, default=30, show_default=True, help="Timed runs per model in the report.")
@_input_shape
@_opset
@_exporter
@_seed
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


def _device(device: str | None, amp: bool) -> str:
    """The torch device: CUDA when present unless told otherwise; --amp needs CUDA."""
    dev = device or ("cuda" if _cuda() else "cpu")
    if dev == "cuda" and not _cuda():
        raise MtcError("--device cuda: no CUDA device is available")
    if amp and dev != "cuda":
        raise MtcError("--amp needs a CUDA device (mixed precision is not used on CPU)")
    return dev


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _register_optional() -> None:
    # Commands from other subsystems register here as they land; missing ones are skipped so the
    # CLI works during development.
    try:
        from mtc.lower.cli import verify_cmd
    except ImportError:
        return
    main.add_command(verify_cmd, "verify")


_register_optional()

if __name__ == "__main__":  # pragma: no cover
    main(prog_name="mtc")
