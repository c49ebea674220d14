"""Clauses of area ``compile``: adapter layers under ``torch.compile`` (checks: ``conformance.clauses.compile.checks``)."""

from conformance.clauses.clause import declare

#: where dynamo's silent eager fallback is defined (why "compiled" is checked, not assumed)
SOURCE_DYNAMO = (
    "torch 2.13 torch/_dynamo/config.py recompile_limit (alias cache_size_limit, default 8) and "
    "fail_on_recompile_limit_hit (default False: past the limit dynamo runs the frame eagerly, with a warning)"
)

declare(
    "COMPILE-FORWARD", "MUST",
    "torch.compile(layer, backend=B) of an adapter layer (B: aot_eager on the CPU, inductor on CUDA), called "
    "twice in eval mode under torch.no_grad(), gives outputs with the input's leading dims, out_features and dtype, "
    "within the float64 oracle bound of FWD-ORACLE, for the base-layer settings of FWD-ORACLE in the standard layout "
    "(each value once; every pair with --slow); and each call ran at least one compiled graph (a call dynamo ran "
    "eagerly fails).",
    source=f"{SOURCE_DYNAMO}; torch 2.13 torch/_dynamo/eval_frame.py OptimizedModule; peft v0.21.2 "
    "src/peft/tuners/lora/bnb.py forward; src/peft/tuners/oft/layer.py forward",
    tiered=True,
    area="compile",
)

declare(
    "COMPILE-MERGE-CYCLE", "MUST",
    "On one compiled adapter layer (torch.compile(layer, backend=B), compiled once): a compiled forward, merge(), a "
    "compiled forward, unmerge(), a compiled forward, all in eval mode under torch.no_grad(): the merged output is "
    "within the bound of one requantization of the merge target (as MERGE-FORWARD-BOUND), the others within the "
    "float64 oracle bound of the layer as it is at that step, and each call ran at least one compiled graph (a "
    "compiled graph that keeps reading the weights from before a merge, or a call dynamo ran eagerly, fails).",
    source=f"{SOURCE_DYNAMO}; peft v0.21.2 src/peft/tuners/lora/bnb.py Linear4bit.merge (assigns a new "
    "bnb.nn.Params4bit, dropping the attributes torch.compile adds, those starting with '_') and Linear4bit.unmerge "
    "(assigns a new Params4bit from weight.__dict__ as it is); Linear8bitLt.merge/unmerge (new bnb.nn.Int8Params)",
    requires=["unmerge"],
    tiered=True,
    area="compile",
)
