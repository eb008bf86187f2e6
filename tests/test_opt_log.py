"""Each optimizer logs in its own words: LC keeps Condensa's L-C lines (w, theta, mu, L step); FineTune,
Gradual and Direct describe what they do, with none of L-C's words."""

from __future__ import annotations

import re

import pytest
from test_lc import run

from fxcondensa.opt import LC, Direct, FineTune, Gradual
from fxcondensa.schemes import Prune, StructurePrune

# Words that only mean something for L-C: its penalty, its two weight sets, its step names, Condensa's banner.
LC_WORDS = re.compile(r"mu=|\bmu\b|L-step|Skipping first|Nested|theta|L-C|ENGINE CONFIG|\bw (VAL|TEST)")


def log_of(opt, scheme, caplog) -> str:
    caplog.clear()
    with caplog.at_level("INFO", logger="fxcondensa"):
        run(opt, scheme)
    return caplog.text


@pytest.mark.parametrize("opt", [
    FineTune(iterations=6, evaluations=2, l_batch_size=64, device="cpu", progress=True),
    Gradual(iterations=8, pruning_steps=3, evaluations=1, l_batch_size=64, device="cpu", progress=True),
    Direct(),
], ids=["FineTune", "Gradual", "Direct"])
def test_other_optimizers_log_without_lc_words(opt, caplog):
    text = log_of(opt, StructurePrune(0.5), caplog)
    name = type(opt).__name__
    assert name in text
    assert not LC_WORDS.search(text), LC_WORDS.search(text)
    if name != "Direct":  # the trained ones say what each iteration does, then how it scored
        assert f"{name} iteration 0 VAL: loss" in text and "is the best so far (by VAL)" in text
        assert "uncompressed model VAL: loss" in text


def test_finetune_and_gradual_say_what_their_iterations_do(caplog):
    text = log_of(FineTune(iterations=6, evaluations=2, l_batch_size=64, device="cpu", progress=True),
                  Prune(0.2), caplog)
    assert "FineTune: direct compression first" in text
    assert "FineTune evaluation 2 of 2: minibatches 4-6 of 6 under the masks" in text
    assert "FineTune iteration 1: 3 minibatches, mean loss" in text  # the progress line, one per iteration
    text = log_of(Gradual(iterations=8, pruning_steps=3, evaluations=1, l_batch_size=64, device="cpu"),
                  Prune(0.2), caplog)
    assert "Gradual pruning step 1 of 3: pruning to 70% of the target sparsity" in text
    assert "Gradual fine-tuning 1 of 1 at the target" in text


def test_lc_keeps_condensas_words(caplog):
    lc = LC(steps=2, l_batch_size=64, sgd_iterations_first_l=5, sgd_iterations_per_l=5, device="cpu")
    text = log_of(lc, Prune(0.5), caplog)
    for line in ("LC ENGINE CONFIG [", "LC Iteration 0:\tmu=0.00000", "Skipping first L-step", "L-step 1: 5 minibatches",
                 "Nested (theta) VAL\tloss=", "Saving model based on VAL", "w VAL\tloss="):
        assert line in text, line
