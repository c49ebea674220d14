"""The harness' view of a malformed layer: ``conformance.quant.validate`` at build time.

``execute`` asks ``problems`` when a check failed or crashed, so a layer the implementation left
malformed is reported with what is wrong (e.g. ``merged base weight is 64x48, expected 48x64``)
instead of ``error``. What a forward may change (compute dtype, bias dtype) is not recorded here.
"""

from __future__ import annotations

from conformance.quant.validate import Expected, expected_of, problems

__all__ = ["Expected", "expected_of", "problems"]
