#!/usr/bin/env python
"""Reproducer: STATE-INVALID-STEP-SAFE violated by implementation 'peft' on cpu (by a invalid:set_unknown step).

Found by the stateful conformance machine (conformance.clauses.stateful), shrunk by hypothesis.

Violation:
    [lora-fp4-dq-32x24-v2, step 1: <invalid step set_unknown> (must raise or warn and change nothing)] invalid
    step set_adapter(['nope']): active_adapters=['nope'], the sequence set ['a0'] (the invalid step was silently
    accepted but changed the state: STATE-ADAPTERS-PRESERVED)

Versions: python 3.11.7, torch 2.13.0+cpu, bitsandbytes 0.50.2, conformance 0.1.0, implementation peft 0.21.2, peft 0.21.2

Minimal sequence (the calls made on the layer):
    0. base = make_base_layer(32, 24, **{'bits': 4, 'quant_type': 'fp4', 'blocksize': 32, 'double_quant': True, 'compute_dtype': torch.float32, 'bias': True, 'cpu_packed': False, 'seed': 0}); torch.manual_seed(0); layer = impl.create(base, AdapterSpec('lora', 'a0', {'r': 4, 'lora_alpha': 16.0, 'init_lora_weights': False, 'lora_bias': True}))
    1. <invalid step set_unknown> (must raise or warn and change nothing)

Run: python {this file} [--device cpu|cuda] [--hash-seeds N]  (exit 1 when the divergence reproduces, 0 when
it does not, 2 when it cannot be replayed here; --hash-seeds N lists the PYTHONHASHSEED values of 0..N-1
that show it, for a finding that depends on set iteration order)
"""
import json
import sys

sys.path.insert(0, '/work/main')  # the conformance checkout that wrote this script

from conformance.harness.loader import load
from conformance.clauses.stateful.reproducer import reproduce

TARGET = 'peft'
CLAUSE = 'STATE-INVALID-STEP-SAFE'
HASHSEED = None  # PYTHONHASHSEED of the run that found it (None: random; try --hash-seeds N)
CONFIG = json.loads("{\"method\": \"lora\", \"bits\": 4, \"in_features\": 32, \"out_features\": 24, \"quant_type\": \"fp4\", \"double_quant\": true, \"blocksize\": 32, \"bias\": true, \"variant\": 2, \"seed\": 0}")
STEPS = json.loads("[{\"op\": \"invalid\", \"kind\": \"set_unknown\", \"seed\": 0}]")

if __name__ == "__main__":
    sys.exit(reproduce(load(TARGET), CLAUSE, CONFIG, STEPS, 'cpu', sys.argv[1:], HASHSEED))
