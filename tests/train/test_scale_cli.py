"""The scale options on the command line: bad values are one line, exit 2, nothing written; a
baseline trains with a learned weighting and worker processes and records them."""

from __future__ import annotations

import json

import pytest
from conftest import BACKBONES, run_mtc

BASE = ["baseline", str(BACKBONES / "tiny_densenet.onnx"), "--tasks", "a:regress:1,b:class:2", "--head-width", "8",
        "--input-shape", "1,3,32,32", "--data", "tinydata:factory?n=16", "--run-dir", "base", "--batch-size", "4",
        "--quiet"]


@pytest.mark.parametrize("args,needle", [
    (["--weighting", "nope"], "'nope' is not one of"),
    (["--workers", "-1"], "-1 is not in the range x>=0"),
])
def test_bad_scale_options_are_one_line(tmp_path, args, needle):
    r = run_mtc(*BASE, "--steps", "1", *args, cwd=tmp_path)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr
    assert not (tmp_path / "base").exists()


def test_baseline_with_uncertainty_weighting_and_workers(tmp_path):
    run_mtc(*BASE, "--steps", "3", "--weighting", "uncertainty", "--workers", "1", cwd=tmp_path, check=True)
    recs = [json.loads(x) for x in (tmp_path / "base" / "multi" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r.get("stage") == "train"]
    assert steps and set(steps[0]["weighting"]) == {"a", "b"} and set(steps[0]["log_var"]) == {"a", "b"}
    assert json.loads((tmp_path / "base" / "baselines.json").read_text())["single"].keys() == {"a", "b"}


def test_a_weighting_constant_the_weighting_does_not_read_is_refused():
    from mtc.cli import _scale_options
    from mtc.errors import MtcError

    with pytest.raises(MtcError, match="--gradnorm-alpha does not apply to --weighting dwa"):
        _scale_options({"weighting": "dwa", "gradnorm_alpha": 2.0, "weighting_lr": None, "dwa_temperature": 2.0})
    # equal records nothing (config.json as before); the others record what they read
    assert _scale_options({"weighting": "equal", "workers": 3}) == ({}, 3)
    assert _scale_options({"weighting": "gradnorm", "gradnorm_alpha": 0.5, "weighting_lr": None}) == (
        {"weighting": "gradnorm", "weighting_lr": None, "gradnorm_alpha": 0.5}, 0)
