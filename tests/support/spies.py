"""Counting calls of a product function while it still runs (a spy, never a stand-in for the code under test)."""

from __future__ import annotations


class Counted:
    """Calls of `module.name`, passed through to the original."""

    def __init__(self, monkeypatch, module, name: str) -> None:
        self.calls = 0
        original = getattr(module, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
