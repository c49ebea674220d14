#!/usr/bin/env python
"""A 4-bit model that bitsandbytes repacked on a CPU with AVX512-BF16 does not come back from save_pretrained as it was.

transformers + bitsandbytes + torch only, a tiny random Llama built from a config, no download. Found by
MODEL-SAVE-MERGED (conformance) on the H200 host's Xeon CPU (torch 2.11.0, bitsandbytes 0.50.2, transformers 5.17.0).

bitsandbytes 0.50 repacks a 4-bit layer into its CPU layout at the first eval-mode no-grad forward on a CPU with
AVX512-BF16 (``Linear4bit.forward`` -> ``_convert_weight_packed_for_cpu``; the block absmax is rounded to bfloat16).
A model saved after that forward (any evaluation, any ``generate``) and read back decodes to other weights in some
layers, and its logits differ from the ones the saved model gave. On a CPU without AVX512-BF16, or on CUDA, the
layers never repack and the round trip is exact.

Run: ``python cpu_packed_save.py``. Exit 1 while the reloaded logits differ, 0 when they are identical, 2 on a CPU
whose bitsandbytes does not repack (no AVX512-BF16, or its CUDA library is loaded: run with CUDA_VISIBLE_DEVICES=).
"""

import sys
import tempfile
import warnings

import bitsandbytes as bnb
import torch
import transformers
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

warnings.simplefilter("ignore")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()


def repacked(layer: torch.nn.Module) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def decoded(layer: torch.nn.Module) -> torch.Tensor:
    w, qs = layer.weight, layer.weight.quant_state
    if repacked(layer):
        import copy

        state = copy.copy(qs)
        data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(w.data.clone(), state)
        state.absmax = qs.absmax.float().t().reshape(-1).contiguous()
        state.nested, state.state2, state.offset = False, None, None
        return bnb.functional.dequantize_4bit(data, state).float()
    return bnb.functional.dequantize_4bit(w.data, qs).float()


def main() -> int:
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, transformers {transformers.__version__}")
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as root:
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(f"{root}/float")
        model = LlamaForCausalLM.from_pretrained(f"{root}/float", device_map="cpu",
                                                 quantization_config=BitsAndBytesConfig(load_in_4bit=True)).eval()
        with torch.no_grad():
            before = model(input_ids=ids).logits
        layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        n_packed = sum(repacked(m) for m in layers.values())
        print(f"  repacked by the eval forward: {n_packed} of {len(layers)} layers")
        if not n_packed:
            print("  bitsandbytes does not repack here (no AVX512-BF16, or its CUDA library is loaded)")
            return 2
        weights = {n: decoded(m) for n, m in layers.items()}
        model.save_pretrained(f"{root}/q4")
        back = LlamaForCausalLM.from_pretrained(f"{root}/q4", device_map="cpu").eval()
        back_layers = {n: m for n, m in back.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        same = sum(torch.equal(decoded(back_layers[n]), w) for n, w in weights.items())
        with torch.no_grad():
            after = back(input_ids=ids).logits
    diff = float((after - before).abs().max())
    print(f"  reloaded layers decoding to the saved weights: {same} of {len(weights)}; max |logit diff| {diff:.3g}")
    if diff > 0 or same < len(weights):
        print(f"DEFECT the saved repacked model reloads with other weights ({len(weights) - same} layers) and logits "
              f"(max |diff| {diff:.3g})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
