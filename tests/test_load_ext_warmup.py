"""``%load_ext nbcompress`` starts the kernels' background warm-up unless switched off."""

from __future__ import annotations

import nbcompress
import nbcompress.kernels as kernels


def test_load_ext_starts_the_background_warmup(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "warmup", lambda background=False: calls.append(background))
    monkeypatch.setenv("NBCOMPRESS_WARMUP", "1")
    assert nbcompress.start_background_warmup()
    for thread in __import__("threading").enumerate():
        if thread.name == "nbcompress-warmup-start":
            thread.join(timeout=30)
    assert calls == [True]


def test_warmup_switched_off_by_the_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "warmup", lambda background=False: calls.append(background))
    for value in ("0", "off", "OFF", "false"):
        monkeypatch.setenv("NBCOMPRESS_WARMUP", value)
        assert not nbcompress.start_background_warmup()
    assert calls == []
