"""Checkpoints written by an earlier version resume bit for bit: the fixtures in ``tests/fixtures`` (written by
``tests/fixtures/make_checkpoints.py`` with lightning-clip 0.1.0 as of commit 20beebe) against an uninterrupted run of
today's code."""

from __future__ import annotations

import os

import torch

from tests.conftest import TinyRegressor, regression_loader, trainer_kwargs
from tests.fixtures.make_checkpoints import callbacks, wrapper_run
from tests.lightning_ns import pl

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def _fit(tmp_path, epochs: int, ckpt: str | None = None):
    pl.seed_everything(0, verbose=False)
    model, cbs = TinyRegressor(lr=0.05), callbacks()
    kwargs = trainer_kwargs(tmp_path, max_steps=-1, max_epochs=epochs, callbacks=cbs, log_every_n_steps=50)
    pl.Trainer(**kwargs).fit(model, regression_loader(), ckpt_path=ckpt)
    return model, cbs


def test_a_callback_checkpoint_of_the_earlier_version_resumes_bit_for_bit(tmp_path):
    ckpt = os.path.join(FIXTURES, "callbacks_epoch1.ckpt")
    torch.load(ckpt, weights_only=True)  # plain values and tensors only
    straight, cbs_straight = _fit(tmp_path / "a", 2)
    resumed, cbs_resumed = _fit(tmp_path / "b", 2, ckpt=ckpt)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for cb_a, cb_b in zip(cbs_straight, cbs_resumed):
        saved_a, saved_b = cb_a.state_dict(), cb_b.state_dict()
        assert saved_a.keys() == saved_b.keys()
        for key, value in saved_a["states"][0].items():
            assert torch.equal(value, saved_b["states"][0][key]), (cb_a.log_prefix, key)
        assert int(saved_b["states"][0]["seen"]) == 16


def test_a_wrapper_state_dict_of_the_earlier_version_resumes_bit_for_bit():
    saved = torch.load(os.path.join(FIXTURES, "wrapper_step5.pt"), weights_only=True)
    straight_model, straight = wrapper_run(8)
    model, opt = wrapper_run(0)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    for x, y in list(regression_loader())[5:8]:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    for a, b in zip(straight_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    a, b = straight.state_dict()["clipping"], opt.state_dict()["clipping"]
    assert a["steps"] == b["steps"] == 8
    for key, value in a["state"].items():
        assert torch.equal(value, b["state"][key]), key
