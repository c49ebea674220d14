#!/usr/bin/env python
"""Reproducer: STATE-VALID-NEVER-RAISES violated by implementation 'peft' on cpu (by a merge step).

Found by the stateful conformance machine (conformance.clauses.stateful), shrunk by hypothesis.

Violation:
    [lora-nf4-64x40-v2, step 1: layer.merge(safe_merge=True, adapter_names=['a0'])] valid step merge raised
    RuntimeError: Boolean value of Tensor with more than one value is ambiguous (at bnb.py:406)

Versions: python 3.11.7, torch 2.13.0+cpu, bitsandbytes 0.50.2, conformance 0.1.0, implementation peft 0.21.2, peft 0.21.2

Minimal sequence (the calls made on the layer):
    0. base = make_base_layer(64, 40, **{'bits': 4, 'quant_type': 'nf4', 'blocksize': 64, 'double_quant': False, 'compute_dtype': torch.float32, 'bias': True, 'cpu_packed': False, 'seed': 261}); torch.manual_seed(261); layer = impl.create(base, AdapterSpec('lora', 'a0', {'r': 4, 'lora_alpha': 16.0, 'init_lora_weights': False, 'lora_bias': True}))
    1. layer.merge(safe_merge=True, adapter_names=['a0'])

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
CLAUSE = 'STATE-VALID-NEVER-RAISES'
HASHSEED = None  # PYTHONHASHSEED of the run that found it (None: random; try --hash-seeds N)
CONFIG = json.loads("{\"method\": \"lora\", \"bits\": 4, \"in_features\": 64, \"out_features\": 40, \"quant_type\": \"nf4\", \"double_quant\": false, \"blocksize\": 64, \"bias\": true, \"variant\": 2, \"seed\": 261}")
STEPS = json.loads("[{\"op\": \"merge\", \"adapter_names\": [\"a0\"], \"safe_merge\": true}]")

if __name__ == "__main__":
    sys.exit(reproduce(load(TARGET), CLAUSE, CONFIG, STEPS, 'cpu', sys.argv[1:], HASHSEED))
