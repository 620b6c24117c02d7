"""Put a stand-in `cuda.bindings.driver` module in sys.modules for one test."""

from __future__ import annotations

import sys
import types


def install_driver(monkeypatch, driver) -> None:
    bindings = types.ModuleType("cuda.bindings")
    bindings.driver = driver
    cuda = types.ModuleType("cuda")
    cuda.bindings = bindings
    for name, mod in (("cuda", cuda), ("cuda.bindings", bindings),
                      ("cuda.bindings.driver", driver)):
        monkeypatch.setitem(sys.modules, name, mod)
