"""L-C checkpoints: a run killed at any point resumes and ends exactly as an uninterrupted run.

One run is a subprocess (this file is also the script it runs) that SIGKILLs itself at a chosen call of
the loss, mid L step; the next crashes in-process at a later call; the last resumes to the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from test_lc import _trained, tiny_model, tiny_problem
from torch import nn

import fxcondensa as condensa
from fxcondensa.errors import FileFormatError
from fxcondensa.opt import checkpoint as ck
from fxcondensa.schemes import Prune

HERE = os.path.dirname(os.path.abspath(__file__))
ARGS = dict(steps=4, l_batch_size=64, lr=0.05, lr_decay=0.98, momentum=0.9, sgd_iterations_per_l=20,
            sgd_iterations_first_l=30, mu_init=1e-2, mu_multiplier=2.0, mu_cap=1e4, val_batch_size=512)


class Crash(Exception):
    """An in-process stand-in for a kill, raised from inside the loss."""


def main(checkpoint: str, out: str, kill_at: int, how: str = "sigkill") -> None:
    """Run L-C on the tiny problem and save the result; die at the ``kill_at``-th loss call (0: never)."""
    calls = 0

    def criterion(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == kill_at:
            if how == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise Crash
        return nn.functional.cross_entropy(out, y)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic in the test process and in the subprocess
    try:
        train, val, test = tiny_problem()
        model = _trained.__wrapped__(0, True, 300)  # BatchNorm: recalibration is part of the state
        lc = condensa.opt.LC(**ARGS, device="cpu", checkpoint=checkpoint or None, progress=False)
        c = condensa.Compressor(lc, Prune(0.05), model, train, test, val, criterion)
        result = c.run()
    finally:
        torch.set_num_threads(threads)
    torch.save(dict(result.state_dict()), out)
    history = [{k: v for k, v in h.items() if k != "elapsed"} for h in c.statistics["history"]]
    with open(out + ".json", "w") as f:
        json.dump({"history": history, "best": c.statistics["best_iteration"]}, f)


def _result(tmp_path, name: str):
    out = str(tmp_path / f"{name}.pt")
    with open(out + ".json") as f:
        return torch.load(out, weights_only=True), json.load(f)


def test_killed_then_crashed_then_resumed_equals_uninterrupted(tmp_path):
    main("", str(tmp_path / "full.pt"), 0)
    ckpt = str(tmp_path / "lc.ckpt")
    # Loss calls: the Compressor's baseline (val, test), then per iteration the SGD steps and two
    # evaluations. Call 20 is inside the first L step, after iteration 0's checkpoint.
    cmd = [sys.executable, __file__, ckpt, str(tmp_path / "a.pt"), "20"]
    proc = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert torch.load(ckpt, weights_only=True)["next_iteration"] == 1  # plain data only
    # Resumed at iteration 1: call 45 is inside the second L step, after iteration 1's checkpoint.
    with pytest.raises(Crash):
        main(ckpt, str(tmp_path / "b.pt"), 45, how="raise")
    assert torch.load(ckpt, weights_only=True)["next_iteration"] == 2
    main(ckpt, str(tmp_path / "c.pt"), 0)
    full, full_stats = _result(tmp_path, "full")
    resumed, resumed_stats = _result(tmp_path, "c")
    assert full_stats == resumed_stats
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    # A finished checkpoint: the same result again, without training (a loss call inside L would crash).
    main(ckpt, str(tmp_path / "d.pt"), 5, how="raise")
    again, again_stats = _result(tmp_path, "d")
    assert again_stats == full_stats and all(torch.equal(full[k], again[k]) for k in full)


def _lc(ckpt, **kw):
    return condensa.opt.LC(**{**ARGS, "steps": 2, "sgd_iterations_first_l": 5, **kw}, device="cpu",
                           checkpoint=ckpt, progress=False)


def _compress(lc, scheme=None):
    train, val, test = tiny_problem()
    c = condensa.Compressor(lc, scheme or Prune(0.05), tiny_model(), train, test, val, nn.CrossEntropyLoss())
    return c.run(), c.statistics


def test_other_arguments_refuse_the_checkpoint(tmp_path):
    ckpt = str(tmp_path / "lc.ckpt")
    _compress(_lc(ckpt))
    with pytest.raises(ValueError, match=r"another run:\n.*lr: checkpoint has 0.05, this run has 0.1"):
        _compress(_lc(ckpt, lr=0.1))
    with pytest.raises(ValueError, match="scheme"):
        _compress(_lc(ckpt), Prune(0.2))


def test_garbage_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "lc.ckpt"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(FileFormatError, match="cannot read L-C checkpoint"):
        _compress(_lc(str(ckpt)))
    torch.save({"format": "something-else"}, ckpt)
    with pytest.raises(FileFormatError, match="not an fxcondensa L-C checkpoint"):
        _compress(_lc(str(ckpt)))


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "x.ckpt")
    ck.save_atomic({"a": torch.ones(2)}, path)

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ck.save_atomic({"a": torch.zeros(2)}, path)
    assert os.listdir(tmp_path) == ["x.ckpt"]  # no temporary file left behind
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
