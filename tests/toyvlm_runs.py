"""Shared by the toy training tests: a tiny run, and the same run killed and resumed (``toyvlm.train --resume``)."""

import pytest
import torch

from toyvlm import train as T


class Killed(Exception):
    pass


def tiny_run(tmp_path_factory, config, name: str):
    """(output folder, summary) of an uninterrupted training with ``config``."""
    out = tmp_path_factory.mktemp(name) / "toy"
    return out, T.train(config, out, log_every=1, progress=False)


def killed_and_resumed(config, out, monkeypatch, kills=(1, 1, 2)):
    """Train ``config`` into ``out``, run ``i`` killed before the backward pass of its ``kills[i]``-th loss (from 0;
    every run resumes the last), then once more to the end. Returns (the training state on disk after each kill, the
    final summary). With the default kills: the tower's step 1 (--resume without a state starts afresh), then main
    steps 0 and 2."""
    state = out / T.STATE_FILE
    monkeypatch.setattr(T, "STATE_EVERY_SECONDS", 0)  # a state after every step
    stock_total = T.weighted_total
    saved = []
    for call in kills:
        calls = iter(range(call + 1))

        def total(losses, config, calls=calls, call=call):
            if next(calls) == call:
                raise Killed
            return stock_total(losses, config)

        monkeypatch.setattr(T, "weighted_total", total)
        with pytest.raises(Killed):
            T.train(config, out, log_every=1, progress=False, resume=True)
        saved.append(torch.load(state, weights_only=True))
    monkeypatch.setattr(T, "weighted_total", stock_total)
    return saved, T.train(config, out, log_every=1, progress=False, resume=True)


def assert_same_run(out, summary, reference, expected) -> None:
    """The run in ``out`` (``summary``) has the weights of the one in ``reference`` bit for bit, and its logs and
    validation (times aside); its training state is gone."""
    from safetensors.torch import load_file

    got, want = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[name], want[name]) for name in want)
    untimed = lambda entries: [{k: v for k, v in e.items() if not k.endswith("seconds")} for e in entries]  # noqa: E731
    for name in ("log", "evaluations", "tower_log"):
        assert untimed(summary[name]) == untimed(expected[name]), name
    assert summary["validation"] == expected["validation"]
    assert not (out / T.STATE_FILE).exists()
