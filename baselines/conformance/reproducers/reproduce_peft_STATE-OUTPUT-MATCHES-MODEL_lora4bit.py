#!/usr/bin/env python
"""Reproducer: STATE-OUTPUT-MATCHES-MODEL violated by implementation 'peft' on cpu.

Found by the stateful conformance machine (conformance.stateful), shrunk by hypothesis.

Violation:
    [lora-nf4-64x40-v0, step 4: x = randn((2, in), seed=101).to(float32); y = layer(x, adapter_names=['a2',
    'a0'])] output differs from the float64 model beyond the analytic bound: at (0, 34): got -2.0578163, expected
    -2.0557785 (|diff| 0.00204 > bound 4.76e-05, ratio 42.8); state: active=['a0'], merged=[], disabled=False,
    training=True, requantizations=0

Versions: python 3.11.7, torch 2.13.0+cpu, bitsandbytes 0.50.2, conformance 0.1.0, implementation peft 0.21.2, peft 0.21.2

Minimal sequence (the calls made on the layer):
    0. base = make_base_layer(64, 40, **{'bits': 4, 'bias': True, 'seed': 0, 'quant_type': 'nf4', 'double_quant': False, 'blocksize': 64}); torch.manual_seed(0); layer = impl.create(base, AdapterSpec('lora', 'a0', {'r': 4, 'lora_alpha': 8.0, 'init_lora_weights': False}))
    1. for every adapter parameter p: p.data = p.data.to(torch.bfloat16)
    2. torch.manual_seed(57); layer.add_adapter('a1', **{'r': 4, 'lora_alpha': 8.0, 'init_lora_weights': False})
    3. torch.manual_seed(224); layer.add_adapter('a2', **{'r': 2, 'lora_alpha': 4.0, 'init_lora_weights': False, 'use_rslora': True})
    4. x = randn((2, in), seed=101).to(float32); y = layer(x, adapter_names=['a2', 'a0'])

Run: python {this file} [--device cpu|cuda]  (exit 1 when the divergence reproduces, 0 when it does not)
"""
import json
import sys

sys.path.insert(0, '/work/main')  # the conformance checkout that wrote this script

from conformance.stateful.reproducer import reproduce

CONFIG = json.loads("{\"method\": \"lora\", \"bits\": 4, \"in_features\": 64, \"out_features\": 40, \"quant_type\": \"nf4\", \"double_quant\": false, \"blocksize\": 64, \"bias\": true, \"variant\": 0, \"seed\": 0}")
STEPS = json.loads("[{\"op\": \"dtype_move\", \"dtype\": \"bfloat16\"}, {\"op\": \"add_adapter\", \"name\": \"a1\", \"variant\": 0, \"params\": {\"r\": 4, \"lora_alpha\": 8.0, \"init_lora_weights\": false}, \"seed\": 57}, {\"op\": \"add_adapter\", \"name\": \"a2\", \"variant\": 1, \"params\": {\"r\": 2, \"lora_alpha\": 4.0, \"init_lora_weights\": false, \"use_rslora\": true}, \"seed\": 224}, {\"op\": \"mixed_forward\", \"adapter_names\": [\"a2\", \"a0\"], \"dtype\": \"float32\", \"seed\": 101}]")

if __name__ == "__main__":
    sys.exit(reproduce('peft', 'STATE-OUTPUT-MATCHES-MODEL', CONFIG, STEPS, 'cpu', sys.argv[1:]))
