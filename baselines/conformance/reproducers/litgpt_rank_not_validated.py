#!/usr/bin/env python
"""LitGPT: ``LoRALinear`` does not refuse a rank r <= 0 with an error that names r.

Plain torch + litgpt, no conformance import. Found by ``FWD-ERR-RANK`` (``--impl litgpt``).
``litgpt/lora.py`` (0.5.13) ``LoRALayer.__init__`` has only ``assert r >= 0``: ``r=0`` is accepted
silently (LitGPT uses it to mean "LoRA off": no ``lora_A``/``lora_B`` are created and ``forward``
returns the base output), and ``r=-2`` fails the bare assert with an empty message (and passes
under ``python -O``, leaving a layer without LoRA parameters).

Run: ``python litgpt_rank_not_validated.py``. Exit 1 while it reproduces, 0 when both ranks are
refused with a ValueError naming r.
"""

import sys
from importlib import metadata

from litgpt.lora import LoRALinear


def main() -> int:
    print(f"litgpt {metadata.version('litgpt')}")
    reproduced = False
    for r in (0, -2):
        try:
            layer = LoRALinear(64, 48, r=r, lora_alpha=16)
        except ValueError as exc:
            ok = "r" in str(exc)
            print(f"r={r}: ValueError({exc!s}){'' if ok else ' (does not name r)'}")
            reproduced |= not ok
            continue
        except Exception as exc:  # noqa: BLE001 - the outcome is what we report
            print(f"REPRODUCED: r={r}: {type(exc).__name__}({exc!s}) instead of a ValueError naming r")
            reproduced = True
            continue
        print(f"REPRODUCED: r={r} accepted silently (has lora_A: {hasattr(layer, 'lora_A')})")
        reproduced = True
    return 1 if reproduced else 0


if __name__ == "__main__":
    sys.exit(main())
