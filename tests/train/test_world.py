"""Bad input under torchrun, checked in-process: more processes per node than GPUs, a global batch
that does not split over the ranks, a resume with another world size."""

from __future__ import annotations

import pytest
import torch

from mtc.errors import MtcError
from mtc.tasks.spec import TaskSpec
from mtc.train import distributed
from mtc.train.loop import Batcher


def test_more_processes_per_node_than_gpus_is_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(distributed, "_WORLD", distributed.World())
    with pytest.raises(MtcError, match=r"--nproc-per-node 4 is more than the 2 CUDA device\(s\) of this node"):
        distributed.start("cuda")
    assert not torch.distributed.is_initialized()


def test_a_global_batch_must_split_over_the_ranks():
    data = [(torch.zeros(3, 4, 4), {"a": torch.zeros(1)}) for _ in range(10)]
    with pytest.raises(MtcError, match="--batch-size 5 does not split over 2 processes"):
        Batcher(data, [TaskSpec("a", "regress", 1)], 5, 0, "train", shard=(1, 2))
    b = Batcher(data, [TaskSpec("a", "regress", 1)], 4, 0, "train", shard=(1, 2))
    assert list(b.shard_indices(3)) == list(b.indices(3)[2:4])  # rank 1 reads the second half


def test_resume_with_another_world_size_names_both(monkeypatch):
    monkeypatch.setattr(distributed, "_WORLD", distributed.World(rank=0, size=1))
    with pytest.raises(MtcError, match="started with 2 processes and resumes only with as many "
                                       r"\(1 process now\): run it torchrun --nproc-per-node 2"):
        distributed.check_resume(2, source="run")
    distributed.check_resume(1, source="run")
