#!/usr/bin/env python
"""Reproducer: STATE-VALID-NEVER-RAISES violated by implementation 'peft' on cuda.

Found by the stateful conformance machine (conformance.spec.stateful), shrunk by hypothesis.

Violation:
    [lora-int8-64x40-v0, step 1: layer = layer.to('cpu')] device_move: layer.to('cpu') left tensors on another
    device: layer.weight.CB on cuda:0, layer.weight.SCB on cuda:0, layer.base_layer.weight.CB on cuda:0,
    layer.base_layer.weight.SCB on cuda:0; a forward would hand them to the kernels of the new device (on CUDA: an
    illegal memory access)

Versions: python 3.12.3, torch 2.11.0+cu130, bitsandbytes 0.50.2, conformance 0.1.0, implementation peft 0.21.0, peft 0.21.0

Minimal sequence (the calls made on the layer):
    0. base = make_base_layer(64, 40, **{'bits': 8, 'bias': True, 'seed': 0}); torch.manual_seed(0); layer = impl.create(base, AdapterSpec('lora', 'a0', {'r': 4, 'lora_alpha': 8.0, 'init_lora_weights': False}))
    1. layer = layer.to('cpu')

Run: python {this file} [--device cpu|cuda] [--hash-seeds N]  (exit 1 when the divergence reproduces, 0 when it does not,
2 when it cannot be replayed here)
"""
import json
import os
import sys

# the checkout this stored script lives in (baselines/conformance/reproducers/ -> its root)
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', '..')))

from conformance.harness.loader import load
from conformance.spec.stateful.reproducer import reproduce

TARGET = 'peft'
HASHSEED = None  # PYTHONHASHSEED the finding needs (None: any; try --hash-seeds N)
CLAUSE = 'STATE-VALID-NEVER-RAISES'
CONFIG = json.loads("{\"method\": \"lora\", \"bits\": 8, \"in_features\": 64, \"out_features\": 40, \"quant_type\": \"nf4\", \"double_quant\": false, \"blocksize\": 64, \"bias\": true, \"variant\": 0, \"seed\": 0}")
STEPS = json.loads("[{\"op\": \"device_move\", \"device\": \"cpu\"}]")

if __name__ == "__main__":
    sys.exit(reproduce(load(TARGET), CLAUSE, CONFIG, STEPS, 'cuda', sys.argv[1:], HASHSEED))
