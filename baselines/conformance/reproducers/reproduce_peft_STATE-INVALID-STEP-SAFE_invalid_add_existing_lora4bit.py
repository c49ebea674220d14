#!/usr/bin/env python
"""Reproducer: STATE-INVALID-STEP-SAFE violated by implementation 'peft' on cpu (by a invalid:add_existing step).

Found by the stateful conformance machine (conformance.clauses.stateful), shrunk by hypothesis.

Violation:
    [lora-nf4-64x40-v0, step 1: <invalid step add_existing> (must raise or warn and change nothing)] invalid step
    add_adapter('a0') of an existing adapter: adapter 'a0' tensor lora_A.weight changed (torch.float32 (4, 64),
    expected torch.float32 (4, 64), max |diff| 0.24) although no step should have changed it (the invalid step was
    silently accepted but changed the state: STATE-ADAPTERS-PRESERVED)

Versions: python 3.11.7, torch 2.13.0+cpu, bitsandbytes 0.50.2, conformance 0.1.0, implementation peft 0.21.2, peft 0.21.2

Minimal sequence (the calls made on the layer):
    0. base = make_base_layer(64, 40, **{'bits': 4, 'quant_type': 'nf4', 'blocksize': 64, 'double_quant': False, 'compute_dtype': torch.float32, 'bias': True, 'cpu_packed': False, 'seed': 0}); torch.manual_seed(0); layer = impl.create(base, AdapterSpec('lora', 'a0', {'r': 4, 'lora_alpha': 8.0, 'init_lora_weights': False}))
    1. <invalid step add_existing> (must raise or warn and change nothing)

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
CONFIG = json.loads("{\"method\": \"lora\", \"bits\": 4, \"in_features\": 64, \"out_features\": 40, \"quant_type\": \"nf4\", \"double_quant\": false, \"blocksize\": 64, \"bias\": true, \"variant\": 0, \"seed\": 0}")
STEPS = json.loads("[{\"op\": \"invalid\", \"kind\": \"add_existing\", \"seed\": 0}]")

if __name__ == "__main__":
    sys.exit(reproduce(load(TARGET), CLAUSE, CONFIG, STEPS, 'cpu', sys.argv[1:], HASHSEED))
