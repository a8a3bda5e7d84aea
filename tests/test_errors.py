"""Bad input never crashes, never runs code, never destroys a file (docs/errors.md).

One test per class of failure, each over several inputs of the class: one stderr line starting with
``mtc: error:``, exit code 2 (1 only for a verification mismatch), no traceback, nothing partial
left behind, inputs unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import BACKBONES, SEARCH_TESTS, invoke_mtc, run_mtc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from mtc.cli import main

if str(SEARCH_TESTS) not in sys.path:
    sys.path.insert(0, str(SEARCH_TESTS))  # the test plug-ins (tinydata, baddata), in-process too

SMALL = ["--pretrain-steps", "2", "--policy-steps", "4", "--batch-size", "4", "--checkpoint-every", "2", "--quiet"]
TINY = BACKBONES / "tiny_resnet.onnx"


def _one_line(r, code: int = 2) -> str:
    err = r.stderr if isinstance(r, subprocess.CompletedProcess) else r.stderr
    rc = r.returncode if isinstance(r, subprocess.CompletedProcess) else r.exit_code
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == code, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("mtc: error:"), err
    assert "Traceback" not in err
    return lines[0]


def _cli(*args: str, cwd: Path):
    """The command in-process (options are checked before any work: no subprocess needed)."""
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def sup(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sup")
    invoke_mtc("compile", str(TINY), "--tasks", "a:regress:1,b:class:2", "--head-width", "8", "--input-shape",
               "1,3,32,32", "-o", "s.mtc.onnx", cwd=d, check=True)
    return d / "s.mtc.onnx"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sup) -> Path:
    d = sup.parent
    invoke_mtc("search", str(sup), "--data", "tinydata:factory", "--run-dir", "run", *SMALL, cwd=d, check=True)
    invoke_mtc("train", "run", "--steps", "2", "--batch-size", "2", "--quiet", cwd=d, check=True)
    invoke_mtc("export", "run", "--fused", "-o", "f.onnx", "--no-report", cwd=d, check=True)
    return d / "run"


# --- 1. code execution: libraries are not replaced by files in the working directory -------------
def test_files_named_like_libraries_in_the_working_directory_are_not_imported(tmp_path, sup):
    for name in ("matplotlib.py", "torch.py", "onnx.py", "numpy.py"):
        (tmp_path / name).write_text("raise SystemExit('the working directory was imported')\n")
    shutil.copy(sup, tmp_path / "s.mtc.onnx")
    args = ["search", "s.mtc.onnx", "--data", "tinydata:factory", "--run-dir", "run", *SMALL]
    r = run_mtc(*args, cwd=tmp_path)  # python -m mtc.cli: Python itself puts the working directory first
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "policy.png").exists()  # matplotlib drew it: the real one
    exe = Path(sys.executable).parent / "mtc"
    env = dict(os.environ, PYTHONPATH=str(SEARCH_TESTS))
    r = subprocess.run([str(exe), *args[:5], "run2", *args[6:]], cwd=tmp_path, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


# --- 2. data loss: an output that would replace an input is refused --------------------------------
def test_an_output_that_is_an_input_is_refused(tmp_path, trained, sup):
    m = tmp_path / "m.onnx"
    shutil.copy(TINY, m)
    run_copy = tmp_path / "run"
    shutil.copytree(trained, run_copy)
    s = tmp_path / "s.mtc.onnx"
    shutil.copy(sup, s)
    (tmp_path / "sub").mkdir()
    before = {p: _digest(p) for p in (m, s, run_copy / "super.mtc.onnx")}
    cases = [
        ["compile", "m.onnx", "--tasks", "seg", "-o", "m.onnx"],
        ["compile", "m.onnx", "--tasks", "seg", "-o", "./m.onnx"],
        ["compile", "m.onnx", "--tasks", "seg", "-o", "sub/../m.onnx"],
        ["import", "m.onnx", "-o", "m.onnx"],
        ["check", "m.onnx", "--golden", "m.onnx", "--update"],
        ["export", "run", "-o", "run/super.mtc.onnx", "--fused"],
        ["export", "s.mtc.onnx", "--plan", "run/plan.json", "--fused", "-o", "s.mtc.onnx"],
    ]
    (tmp_path / "link.onnx").symlink_to(m)
    cases.append(["import", "link.onnx", "-o", "m.onnx"])
    for args in cases:
        line = _one_line(_cli(*args, cwd=tmp_path))
        assert "would replace the input" in line, (args, line)
    assert {p: _digest(p) for p in before} == before


# --- 3. option values are checked where they are parsed -------------------------------------------
BAD_OPTIONS = [
    ("search", "--batch-size", "0"), ("search", "--batch-size", "-3"), ("search", "--checkpoint-every", "0"),
    ("search", "--policy-steps", "-1"), ("search", "--tau0", "0"), ("search", "--tau0", "-2"),
    ("search", "--weight-lr", "nan"), ("search", "--weight-lr", "-1"), ("search", "--policy-lr", "inf"),
    ("search", "--lambda-reg", "nan"), ("search", "--seed", "-1"), ("train", "--steps", "-1"),
    ("train", "--lr", "nan"), ("train", "--lr", "0"), ("train", "--batch-size", "0"), ("export", "--repeat", "0"),
    ("baseline", "--steps", "-5"), ("baseline", "--head-width", "0"), ("compile", "--head-width", "99999999"),
]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(BAD_OPTIONS))
def test_bad_option_values_are_one_line_and_write_nothing(tmp_path_factory, case):
    d = tmp_path_factory.mktemp("opt")
    cmd, opt, value = case
    base = {"search": ["search", "s.mtc.onnx", "--data", "tinydata:factory", "--run-dir", "run"],
            "train": ["train", "run"], "export": ["export", "run", "-o", "out"],
            "baseline": ["baseline", str(TINY), "--tasks", "a", "--data", "tinydata:factory", "--run-dir", "run"],
            "compile": ["compile", str(TINY), "--tasks", "seg"]}[cmd]
    line = _one_line(_cli(*base, opt, value, cwd=d))
    assert opt in line or "task" in line, line
    assert list(d.iterdir()) == []


def test_task_weights_must_be_finite(tmp_path, sup):
    for bad in ("a=nan", "a=-1", "a=inf", "zz=1", "a=x"):
        line = _one_line(_cli("search", str(sup), "--data", "tinydata:factory", "--run-dir", "run",
                              "--task-weights", bad, cwd=tmp_path))
        assert "--task-weights" in line
    assert not (tmp_path / "run").exists()


# --- 4. bad data found late: named, and no half-made run directory --------------------------------
@pytest.mark.parametrize("spec,needle", [
    ("baddata:factory?fault=label&after=10", "task 'b': labels must lie in [0, 2)"),
    ("baddata:factory?fault=shape&after=10", "task 'a': target shape (3,)"),
    ("baddata:factory?fault=raise&after=10", "cannot be read (RuntimeError: disk gone)"),
    ("baddata:factory?claim=40", "cannot be read (IndexError"),
    ("baddata:factory?fault=nan&after=10", "its image holds NaN"),
    ("baddata:factory?explode=raise", "factory raised ValueError: the plug-in is broken"),
    ("baddata:factory?explode=exit", "factory raised SystemExit: 3"),
    ("baddata:factory?claim=1000000000000", "at most 1,000,000,000"),
])
def test_bad_data_names_the_data_set_sample_and_task(tmp_path, sup, spec, needle):
    r = run_mtc("search", str(sup), "--data", spec, "--run-dir", "run", "--pretrain-steps", "12",
                "--policy-steps", "0", "--batch-size", "4", "--checkpoint-every", "100", "--quiet", cwd=tmp_path)
    line = _one_line(r)
    assert needle in line, line
    if "sample" in needle or "shape" in needle or "labels" in needle or "NaN" in needle:
        assert "sample" in line
    assert not (tmp_path / "run").exists()  # it never wrote a checkpoint: nothing is left behind


def test_bad_data_after_a_checkpoint_keeps_the_run(tmp_path, sup):
    r = run_mtc("search", str(sup), "--data", "baddata:factory?fault=label&calls=20", "--run-dir", "run",
                "--pretrain-steps", "30", "--policy-steps", "0", "--batch-size", "4", "--checkpoint-every", "2",
                "--quiet", cwd=tmp_path)
    assert "labels must lie in" in _one_line(r)
    assert (tmp_path / "run" / "checkpoints" / "search.safetensors").exists()


def test_a_failed_first_attempt_does_not_poison_the_retry(tmp_path, sup):
    r = run_mtc("search", str(sup), "--data", "baddata:factory?fault=label&after=4", "--run-dir", "run",
                "--seed", "3", *SMALL, cwd=tmp_path)
    assert r.returncode == 2
    run_mtc("search", str(sup), "--data", "tinydata:factory", "--run-dir", "run", "--seed", "5", *SMALL,
            cwd=tmp_path, check=True)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["data"] == "tinydata:factory" and cfg["seed"] == 5


# --- 5. a resume that would change the run, and foreign checkpoints --------------------------------
def test_resume_with_other_options_is_refused_and_foreign_checkpoints_are_one_line(tmp_path, trained, sup):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    # as if killed after the last checkpoint, before the search ended: --resume reads the checkpoint
    log = run / "metrics.jsonl"
    log.write_text("".join(x + "\n" for x in log.read_text().splitlines() if '"search-end"' not in x))
    line = _one_line(_cli("search", str(sup), "--data", "tinydata:factory", "--run-dir", "run", *SMALL[:3], "9",
                          *SMALL[4:], "--resume", cwd=tmp_path))
    assert "--policy-steps 9" in line and "differ" in line
    line = _one_line(_cli("search", str(sup), "--data", "tinydata:factory?n=48", "--run-dir", "run", *SMALL,
                          "--resume", cwd=tmp_path))
    assert "--data" in line
    line = _one_line(_cli("train", "run", "--steps", "3", "--batch-size", "2", "--quiet", "--resume",
                          cwd=tmp_path))
    assert "--steps 3" in line
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    ckpt = run / "checkpoints" / "search.safetensors"
    tensors = load_file(ckpt)
    with safe_open(str(ckpt), "pt") as f:
        meta = json.loads(f.metadata()["mtc"])
    another = {k: v for k, v in list(tensors.items())[1:]}  # a tensor missing
    foreign = {"module/zzz": tensors[next(iter(tensors))]}  # another model's state
    for broken, m in ((another, meta), (foreign, meta), (tensors, {k: v for k, v in meta.items() if k != "optim"})):
        save_file(broken, ckpt, metadata={"mtc": json.dumps(m)})
        line = _one_line(_cli("search", str(sup), "--data", "tinydata:factory", "--run-dir", "run", *SMALL,
                              "--resume", cwd=tmp_path))
        assert "do not fit" in line or "does not belong" in line, line
    save_file(tensors, ckpt, metadata={"mtc": json.dumps({**meta, "step": 10**6})})  # a bad step counter
    assert "outside this training" in _one_line(_cli("search", str(sup), "--data", "tinydata:factory",
                                                     "--run-dir", "run", *SMALL, "--resume", cwd=tmp_path))
    # a binary metrics log is skipped line by line, not a crash
    save_file(tensors, ckpt, metadata={"mtc": json.dumps(meta)})
    (run / "metrics.jsonl").write_bytes(os.urandom(300))
    r = _cli("search", str(sup), "--data", "tinydata:factory", "--run-dir", "run", *SMALL, "--resume", cwd=tmp_path)
    assert r.exit_code == 0, r.output


# --- 6. the environment at write time ---------------------------------------------------------------
def test_unwritable_destinations_are_one_line(tmp_path, sup):
    for args in (["import", str(TINY), "-o", "/proc/mtc-test/x.onnx"],
                 ["compile", str(TINY), "--tasks", "seg", "-o", "/proc/mtc-test/x.mtc.onnx"],
                 ["export", str(sup), "--plan", "nope.json", "-o", "/proc/mtc-test/out"]):
        line = _one_line(_cli(*args, cwd=tmp_path))
        assert "/proc" in line or "nope.json" in line
    (tmp_path / "afile").write_text("x")
    assert "afile" in _one_line(_cli("import", str(TINY), "-o", "afile/x.onnx", cwd=tmp_path))


def test_a_full_disk_leaves_nothing_partial(tmp_path, monkeypatch):
    import errno

    import onnx_ir as ir

    real = ir.save

    def full(*a, **k):
        real(*a, **k)
        raise OSError(errno.ENOSPC, "No space left on device", str(a[1]))

    monkeypatch.setattr(ir, "save", full)
    line = _one_line(_cli("import", str(TINY), "-o", "x.onnx", cwd=tmp_path))
    assert "No space left on device" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_temporary_folders_of_killed_processes_are_swept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".mtc-{dead.pid}-abcd"
    stale.mkdir()
    (stale / "half.onnx").write_bytes(b"x" * 100)
    mine = tmp_path / f".mtc-{os.getpid()}-live"
    mine.mkdir()
    run_mtc("import", str(TINY), "-o", "x.onnx", cwd=tmp_path, check=True)
    assert not stale.exists() and mine.exists() and (tmp_path / "x.onnx").exists()
    assert oct((tmp_path / "x.onnx").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


# --- 6b. absurd sizes are refused before anything is allocated ---------------------------------------
def test_absurd_sizes(tmp_path):
    proto = (BACKBONES / "mobilenetv2.prototxt").read_text()
    # (the input renamed to what conv1 reads: no binding warning besides the error line)
    (tmp_path / "big.prototxt").write_text(proto.replace("num_output: 32", "num_output: 2000000000", 1)
                                           .replace('input: "blob1"', 'input: "data"', 1))
    for args, needle in ((["compile", str(TINY), "--tasks", "seg:seg:1000000000"], "too large"),
                         (["compile", str(TINY), "--tasks", "seg", "--head-width", "3000000000"], "--head-width"),
                         (["import", "big.prototxt"], "num_output"),
                         (["import", str(TINY), "--input-shape", "1,3,100000,100000"], "limit")):
        assert needle in _one_line(_cli(*args, cwd=tmp_path)), args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.prototxt"]


# --- 7. models the front end must not accept -------------------------------------------------------
def _model(nodes, inputs, outputs, inits=(), opsets=(("", 18),)):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _w(name, shape):
    return onnx.numpy_helper.from_array(np.ones(shape, np.float32), name)


def test_invalid_graphs_name_the_node_and_the_cause(tmp_path):
    x, y = _vi("x", [1, 3, 8, 8]), _vi("y", [1, 4, 8, 8])
    cases = {
        "mismatch": (_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], [x], [y],
                            [_w("w", (4, 8, 1, 1))]), "shapes do not agree"),
        "cycle": (_model([helper.make_node("Relu", ["b"], ["a"], name="r1"),
                          helper.make_node("Relu", ["a"], ["b"], name="r2"),
                          helper.make_node("Add", ["x", "b"], ["y"], name="add")], [x], [y]), "cycle"),
        "undefined": (_model([helper.make_node("Add", ["x", "ghost"], ["y"], name="add")], [x], [y]),
                      "reads 'ghost'"),
        "unknown op": (_model([helper.make_node("Frobnicate", ["x"], ["y"], name="f")], [x], [y]),
                       "not an ONNX operator"),
        "unknown domain": (_model([helper.make_node("Relu", ["x"], ["y"], name="r", domain="com.acme")], [x], [y]),
                           "domain 'com.acme'"),
        "duplicate": (_model([helper.make_node("Relu", ["x"], ["y"], name="r1"),
                              helper.make_node("Relu", ["x"], ["y"], name="r2")], [x], [y]), "produced twice"),
        "no outputs": (_model([helper.make_node("Relu", ["x"], ["z"], name="r")], [x], []), "no outputs"),
    }
    for name, (m, needle) in cases.items():
        p = tmp_path / f"{name.replace(' ', '_')}.onnx"
        onnx.save(m, p)
        line = _one_line(_cli("import", str(p), "-o", "out.onnx", cwd=tmp_path))
        assert needle in line, (name, line)
        if name not in ("no outputs", "mismatch"):
            assert "node '" in line, (name, line)
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT16, TensorProto.BFLOAT16])
def test_verify_supports_half_precision_inputs(tmp_path, dtype):
    x, y = helper.make_tensor_value_info("x", dtype, [1, 3, 4, 4]), helper.make_tensor_value_info("y", dtype,
                                                                                                [1, 3, 4, 4])
    p = tmp_path / "h.onnx"
    onnx.save(_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [x], [y]), p)
    r = _cli("verify", str(p), cwd=tmp_path)
    if r.exit_code == 2:  # onnxruntime on this CPU has no kernel for it: one line, not a traceback
        assert "onnxruntime cannot load the model" in _one_line(r)
    else:
        assert r.exit_code == 0, r.output


# --- 8. verify --against: a file from another run ---------------------------------------------------
def test_verify_against_another_run_is_refused(tmp_path, trained, sup):
    other = tmp_path / "other"
    shutil.copytree(trained, other)
    d = trained.parent
    r = run_mtc("train", str(other), "--steps", "3", "--batch-size", "2", "--quiet", "--resume", cwd=d)
    assert r.returncode == 2  # --resume with other options: refused; retrain from scratch instead
    (other / "checkpoints" / "train.safetensors").unlink(missing_ok=True)
    run_mtc("train", str(other), "--steps", "3", "--batch-size", "2", "--quiet", cwd=d, check=True)
    line = _one_line(_cli("verify", str(d / "f.onnx"), "--against", str(other), cwd=tmp_path))
    assert "other weights" in line
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{not json")
    assert "corrupt config.json" in _one_line(_cli("verify", str(d / "f.onnx"), "--against", "junk",
                                                   cwd=tmp_path))


# --- 9. one process per run directory ---------------------------------------------------------------
def test_a_second_process_on_a_run_directory_is_refused(tmp_path, sup):
    env = dict(os.environ, PYTHONPATH=str(SEARCH_TESTS), PYTHONWARNINGS="ignore")
    slow = subprocess.Popen([sys.executable, "-m", "mtc.cli", "search", str(sup), "--data", "tinydata:factory",
                             "--run-dir", "run", "--pretrain-steps", "400", "--policy-steps", "0", "--batch-size",
                             "4", "--quiet"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / ".lock").exists() and time.time() < deadline:
            time.sleep(0.05)
        line = _one_line(run_mtc("search", str(sup), "--data", "tinydata:factory", "--run-dir", "run", *SMALL,
                                 "--resume", cwd=tmp_path))
        assert f"in use by process {slow.pid}" in line
    finally:
        slow.send_signal(signal.SIGKILL)
        slow.wait()
    # the lock of a killed process is stale: the next command takes it over
    (tmp_path / "run" / "checkpoints").mkdir(parents=True, exist_ok=True)
    r = run_mtc("search", str(sup), "--data", "tinydata:factory", "--run-dir", "run2", *SMALL, cwd=tmp_path)
    assert r.returncode == 0, r.stderr


# --- 11. log and resume edge cases ------------------------------------------------------------------
def test_resuming_a_finished_search_changes_nothing(tmp_path, trained, sup):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    plan = (run / "plan.json").read_text()
    run_mtc("search", str(sup), "--data", "tinydata:factory", "--run-dir", "run", *SMALL, "--resume", cwd=tmp_path,
            check=True)
    after = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ends = [r for r in after if r["stage"] == "search-end"]
    assert len(ends) == 1
    old_end = next(r for r in before if r["stage"] == "search-end")
    assert ends[0]["val"] == old_end["val"]  # measured in the same (gumbel) mode
    assert (run / "plan.json").read_text() == plan


# --- 12. messages that help -------------------------------------------------------------------------
def test_messages_that_help(tmp_path, sup):
    # a prototxt warning on a successful compile: one line in mtc's format, no source line
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    r = subprocess.run([sys.executable, "-m", "mtc.cli", "compile", str(BACKBONES / "mobilenetv2.prototxt"),
                        "--tasks", "seg", "--head-width", "8", "-o", "m.mtc.onnx"], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    warn = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 0 and len(warn) == 1 and warn[0].startswith("mtc: warning:")
    assert "--input-shape" in _one_line(_cli("inspect", str(TINY), "--input-shape", "abc", cwd=tmp_path))
    r = run_mtc("search", str(sup), "--data", "tinydata:factory?nan_after=0", "--run-dir", "run",
                "--pretrain-steps", "4", "--policy-steps", "0", "--batch-size", "4", "--quiet", cwd=tmp_path)
    line = _one_line(r)
    assert "iteration 0" in line and "no checkpoint was written yet" in line and "--resume" not in line
