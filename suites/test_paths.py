"""Area ``paths`` (PATH-SEQUENCE) and what it stands on: bitsandbytes' CPU packed layout read through
``quant.layers``, the packed kernel's rounding in the oracle, and the shipped list of bitsandbytes' own failures.

Layout-on runs need a CPU whose bitsandbytes reports AVX512-BF16; elsewhere they are skipped with that reason.
``quant.layers`` reading a repacked weight is tested everywhere: bitsandbytes' repack function
(``_convert_weight_packed_for_cpu``) is plain torch and runs on any CPU (only the packed *kernel* needs the
feature)."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import pytest
import torch

from conformance import numerics
from conformance.clauses.broken import twins
from conformance.clauses.clause import get
from conformance.clauses.paths.broken import MORE
from conformance.clauses.paths.cases import REFUSED_SHAPE, sequence_cases
from conformance.core import upstream
from conformance.harness.execute import run_clause
from conformance.impls.reference import ReferenceImplementation
from conformance.quant import bounds as qbounds
from conformance.quant import layers as qlayers
from conformance.quant import validate as qvalidate
from conformance.testing import broken_twin_tests

AREAS = {"paths"}
BROKEN = twins(AREAS)
PACKED = qlayers.cpu_packed_layout_available()
needs_packed = pytest.mark.skipif(not PACKED, reason="bitsandbytes reports no AVX512-BF16 on this CPU: its packed "
                                  "layout (and the kernel that reads it) does not exist here")

(test_every_clause_of_these_areas_has_a_broken_fixture, test_passes_on_reference,
 test_fails_on_broken) = broken_twin_tests(BROKEN, AREAS)


def _repack(layer: torch.nn.Module) -> None:
    """What ``Linear4bit.forward`` does on an AVX512-BF16 CPU, with bitsandbytes' own function (plain torch)."""
    w = layer.weight
    w.data, w.quant_state = bnb.functional._convert_weight_packed_for_cpu(w.data, w.quant_state)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_reads_the_packed_layout(quant_type: str, double_quant: bool, weight_dtype: torch.dtype) -> None:
    layer = qlayers.make_base_layer(64, 64, quant_type=quant_type, double_quant=double_quant, weight_dtype=weight_dtype)
    before = qlayers.dequantize(layer)
    settings = qlayers.quant_settings(layer)
    expected = qvalidate.expected_of(layer, at_merge=True)
    _repack(layer)
    assert qlayers.is_cpu_packed(layer)
    naive = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    assert (naive - before).abs().max() > 0.1  # the raw read is garbage: what the layout-aware read must avoid
    after = qlayers.dequantize(layer)
    # the packed layer multiplies by its absmax rounded to bfloat16 (and the product rounds to the storage dtype)
    u = qbounds.unit_roundoff(torch.bfloat16)
    us = 0.0 if weight_dtype == torch.float32 else qbounds.unit_roundoff(weight_dtype)
    assert ((after - before).abs() <= before.abs() * ((1 + u) * (1 + us) ** 2 - 1)).all()
    assert qlayers.is_cpu_packed(layer)  # reading did not turn the layer back (it reads a copy)
    assert qlayers.quant_settings(layer) == settings
    assert qvalidate.base_problems(layer, expected) == []
    qlayers.requantize(layer, after)  # back to the standard layout, the original settings kept
    assert not qlayers.is_cpu_packed(layer)
    assert qlayers.quant_settings(layer) == settings
    assert qvalidate.base_problems(layer, expected) == []


def test_weight_bound_of_a_packed_layer() -> None:
    layer = qlayers.make_base_layer(64, 64)
    exact = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) / 8  # make_base_layer's seed-0 weight
    _repack(layer)
    bound = qbounds.weight_bound(layer)
    assert ((qlayers.dequantize(layer).double() - exact.double()).abs() <= bound).all()
    dq = qlayers.make_base_layer(64, 64, double_quant=True)
    _repack(dq)
    with pytest.raises(qlayers.BaseLayerError, match="double-quant statistics"):
        qbounds.weight_bound(dq)


def test_forward_is_packed_follows_bitsandbytes_rule() -> None:
    """``Linear4bit.forward`` repacks a CPU layer with the layout switched on, in eval mode, input without grad."""
    layer = qlayers.make_base_layer(64, 64)
    layer.support_avx512bf16_for_cpu = True  # as bitsandbytes sets it on an AVX512-BF16 CPU (no forward run here)
    layer.eval()
    assert qlayers.forward_is_packed(layer) and not qlayers.forward_is_packed(layer, x_requires_grad=True)
    assert not qlayers.forward_is_packed(layer, training=True)
    _repack(layer)
    assert qlayers.forward_is_packed(layer, training=True, x_requires_grad=True)  # packed: every forward takes it
    off = qlayers.make_base_layer(64, 64)
    assert not off.support_avx512bf16_for_cpu and not qlayers.forward_is_packed(off.eval())


def test_packed_oracle_bound_is_wider_than_the_standard_one() -> None:
    """The packed kernel computes in bfloat16: for a float32 input the bound must grow by about u_bf16 / u_fp32."""
    layer = qlayers.make_base_layer(64, 64).eval()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    standard = numerics.base_expected(layer, x)
    layer.support_avx512bf16_for_cpu = True
    packed = numerics.base_expected(layer, x)
    assert torch.equal(standard.value, packed.value)
    assert (packed.bound > 100 * standard.bound).all()


def test_make_base_layer_refuses_the_layout_where_it_does_not_exist() -> None:
    with pytest.raises(qlayers.PackedLayoutUnavailable, match="4-bit layers only"):
        qlayers.make_base_layer(64, 64, bits=8, cpu_packed=True)
    if not PACKED:
        with pytest.raises(qlayers.PackedLayoutUnavailable, match="no AVX512-BF16"):
            qlayers.make_base_layer(64, 64, cpu_packed=True)


def test_sequence_cases_draw_the_layout_pairwise_with_one_refused_shape() -> None:
    four = sequence_cases(4)
    assert {c.cpu_packed for c in four} == {True, False}
    refused = [c for c in four if c.cpu_pack_refusal]
    assert [(c.in_features, c.out_features) for c in refused] == [REFUSED_SHAPE]
    for d in (torch.float32, torch.float16, torch.bfloat16):  # every compute dtype meets both layouts
        assert {x.cpu_packed for x in four if x.compute_dtype == d} == {True, False}
    assert not any(c.cpu_packed for c in sequence_cases(8))


# -- the shipped list of bitsandbytes' own failures ----------------------------------------------

def test_shipped_list_parses_and_names_existing_reproducers() -> None:
    entries = upstream.load()
    assert {e.key for e in entries} == set(upstream.SITUATIONS)  # every situation a check names, nothing else
    root = upstream.LIST_PATH.parents[1]
    for e in entries:
        assert (root / e.reproducer).is_file(), e.reproducer
        assert e.library in upstream.LIBRARIES and e.versions
        assert upstream.in_range("0.50.2" if e.library == "bitsandbytes" else "5.25.0", e.versions) in (True, False)


@pytest.mark.parametrize(("version", "spec", "want"), [
    ("0.50.2", ">=0.50,<0.51", True), ("0.51.0", ">=0.50,<0.51", False), ("0.49.2", ">=0.50,<0.51", False),
    ("0.50.2.dev0+cpu", "==0.50.2", True), ("1.0", "!=1.0", False),
])
def test_version_ranges(version: str, spec: str, want: bool) -> None:
    assert upstream.in_range(version, spec) is want


@pytest.mark.parametrize(("text", "needle"), [
    ("[k]\nbitsandbytes = >=0.50\nerror = e\nreason = r\n", "missing field(s) ['reproducer']"),
    ("[k]\nbitsandbytes = >=0.50\nerror = e\nreason = r\nreproducer = p\ncolour = red\n", "unknown field(s) ['colour']"),
    ("[k]\nbitsandbytes = ~0.50\nerror = e\nreason = r\nreproducer = p\n", "bad version clause"),
    ("[k]\nbitsandbytes = >=0.50\ncpu_feature = amx\nerror = e\nreason = r\nreproducer = p\n", "unknown cpu_feature"),
    ("bitsandbytes = 1\n", "not a valid list"),
    ("[k]\nbitsandbytes = >=0.50\nerror = e\nreason = r\nreproducer = p\navoidable = maybe\n", "avoidable must be yes or no"),
    ("[k]\nbitsandbytes = >=0.50\ntransformers = >=5\nerror = e\nreason = r\nreproducer = p\n", "exactly one version range"),
    ("[k]\nerror = e\nreason = r\nreproducer = p\n", "exactly one version range"),
])
def test_malformed_list_entries_are_named(text: str, needle: str) -> None:
    with pytest.raises(upstream.UpstreamListError, match=".*") as err:
        upstream.parse(text, "list.ini")
    assert needle in str(err.value) and str(err.value).startswith("list.ini")


def _ctx() -> object:
    from conformance.clauses.context import CheckContext

    return CheckContext(impl=ReferenceImplementation(), clause=get("PATH-SEQUENCE"))


KNOWN = upstream.KnownFailure("k", ">=0", error="boom from bitsandbytes", reason="reason", reproducer="xfails/x.py")


def test_a_listed_failure_is_xfailed_another_failure_is_not_and_a_pass_is_xpassed() -> None:
    ctx = _ctx()
    with ctx.case("listed", known=KNOWN):
        raise RuntimeError("boom from bitsandbytes: details")
    with ctx.case("other failure", known=KNOWN):
        ctx.fail("output outside the bound")
    with ctx.case("passes", known=KNOWN):
        pass
    with ctx.case("unlisted"):
        pass
    outcomes = [o for o, _ in ctx.case_outcomes]
    assert outcomes == ["xfailed", "failed", "xpassed"]
    assert "bitsandbytes known failure k" in ctx.case_outcomes[0][1]
    assert "remove the entry" in ctx.case_outcomes[2][1]


def test_an_avoidable_listed_failure_that_passes_is_a_pass_with_a_note() -> None:
    """An implementation that works around a listed bitsandbytes failure (``avoidable = yes``) passes, it does not
    xpass; failing with the listed error is still xfailed."""
    known = upstream.parse("[k]\nbitsandbytes = >=0\nerror = boom\nreason = r\nreproducer = p\navoidable = yes\n")[0]
    assert known.avoidable and not KNOWN.avoidable
    ctx = _ctx()
    with ctx.case("worked around", known=known):
        pass
    with ctx.case("hit", known=known):
        raise RuntimeError("boom")
    assert [o for o, _ in ctx.case_outcomes] == ["xfailed"]
    assert ctx.notes == ["worked around bitsandbytes known failure k"]


def test_known_upstream_depends_on_the_cpu_feature() -> None:
    ctx = _ctx()
    got = ctx.known_upstream(upstream.CPU_PACKED_TRAIN_GRAD)
    assert (got is not None) == (PACKED and upstream.in_range(bnb.__version__, ">=0.50,<0.51"))
    assert ctx.known_upstream("no-such-key") is None


# -- runs that need the packed layout --------------------------------------------------------------

@needs_packed
def test_reference_reaches_the_packed_layout_and_fails_only_as_listed() -> None:
    res = run_clause(get("PATH-SEQUENCE"), ReferenceImplementation())
    assert res.outcome in ("passed", "xfailed"), res.message
    assert res.measurements.get("steps_on_packed_layout", 0) > 0
    for fam in res.families.values():
        assert not fam.skip_reasons, fam.skip_reasons


@needs_packed
@pytest.mark.parametrize(("clause_id", "impl"), MORE, ids=[b.name for _, b in MORE])
def test_fails_on_broken_where_the_layout_exists(clause_id: str, impl: object) -> None:
    res = run_clause(get(clause_id), impl)
    assert res.outcome == "failed", f"{impl.name}: {res.outcome}: {res.message}"


def test_copy_of_a_packed_layer_reads_the_same() -> None:
    layer = qlayers.make_base_layer(64, 64)
    _repack(layer)
    twin = copy.deepcopy(layer)
    assert torch.equal(qlayers.dequantize(layer), qlayers.dequantize(twin))


def _verdict(body: object) -> tuple[str, str]:
    """The family outcome of a check that runs ``body(ctx)`` (``harness.execute._family_verdict``)."""
    import dataclasses

    from conformance.clauses.context import CheckContext
    from conformance.harness.execute import _family_verdict

    clause = dataclasses.replace(get("PATH-SEQUENCE"), check=body)
    ctx = CheckContext(impl=ReferenceImplementation(), clause=clause, family=("lora", 4))
    return _family_verdict(ctx, clause)


def _listed(ctx: object) -> None:
    with ctx.case("listed", known=KNOWN):
        raise RuntimeError("boom from bitsandbytes")


def test_a_family_whose_only_non_passing_cases_are_listed_is_xfailed() -> None:
    def body(ctx: object) -> None:
        with ctx.case("fine"):
            pass
        _listed(ctx)

    outcome, message = _verdict(body)
    assert outcome == "xfailed" and "bitsandbytes known failure k" in message


def test_a_listed_pass_makes_the_family_xpassed_and_a_real_failure_beats_both() -> None:
    def xpass(ctx: object) -> None:
        _listed(ctx)
        with ctx.case("listed but passes", known=KNOWN):
            pass

    assert _verdict(xpass)[0] == "xpassed"

    def fails(ctx: object) -> None:
        _listed(ctx)
        with ctx.case("listed but passes", known=KNOWN):
            pass
        with ctx.case("broken"):
            ctx.fail("outside the bound")

    outcome, message = _verdict(fails)
    assert outcome == "failed" and "outside the bound" in message
