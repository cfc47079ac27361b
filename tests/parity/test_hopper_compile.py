"""The Triton kernels added for the fast step compile for Hopper (sm_90) here, on a machine with no GPU: Triton
lowers each to PTX and its bundled ptxas assembles the cubin, so a kernel that the interpreter runs but the GPU
compiler refuses (a construct the interpreter accepts, a type the backend cannot lower) fails here, not in a GPU
window. Each kernel is compiled for the pointer dtypes the step launches it with, in a fresh process: this session
built the kernels for Triton's interpreter, which compiles nothing."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.parity

# (module, kernel, pointer arguments -> Triton type, float arguments, constexprs: values or the module's attribute
# names)
_UPSAMPLE, _TRANSPOSE = {"BLOCK_W": "_UPSAMPLE_TILE"}, {"BLOCK_W": "_TRANSPOSE_TILE"}
_TC = {"BLOCK_T": "_BLOCK_T", "BLOCK_C": "_BLOCK_C"}
_FP32 = "*fp32"
KERNELS = {}
for _t in ("fp32", "bf16"):
    KERNELS[f"upsample-{_t}"] = ("bilinear_x2", "_upsample_kernel", {"x": f"*{_t}", "out": f"*{_t}"}, (), _UPSAMPLE)
    KERNELS[f"transpose-{_t}"] = ("bilinear_x2", "_transpose_kernel", {"g": f"*{_t}", "dx": f"*{_t}"}, (), _TRANSPOSE)
_STATS = dict.fromkeys(("psum", "pm2", "mean_out", "rstd_out"), _FP32)
KERNELS["chan-finalize"] = ("channel_sums", "_chan_finalize_kernel", _STATS, ("eps",), _TC)
KERNELS["column-sums"] = (
    "channel_sums",
    "_column_sums_kernel",
    dict.fromkeys(("a", "b", "a_out", "b_out"), _FP32),
    (),
    _TC,
)
# the padded BatchNorm kernels on the native step's path, bf16 activations, a 3x3 conv's pad, an NCHW plane's tiles
_BN = {"PAD": 1, "BLOCK_W": 256, "BLOCK_C": 4, "EVEN_C": True}  # Hopper's plane tile, every level's since
_REDUCTIONS = ("_batch_norm_stats_kernel", "_batch_norm_act_bwd_sums_kernel")  # with a FINALIZE constexpr
for _k, _act in (
    ("_batch_norm_stats_kernel", ("skip_ptr", "deeper_ptr")),
    ("_batch_norm_act_pad_kernel", ("skip_ptr", "deeper_ptr", "out_ptr")),
    ("_batch_norm_act_bwd_sums_kernel", ("grad_ptr", "skip_ptr", "deeper_ptr")),
    ("_batch_norm_act_bwd_apply_kernel", ("grad_ptr", "skip_ptr", "deeper_ptr", "dskip_ptr", "ddeeper_ptr")),
):
    _consts = {k: v for k, v in _BN.items() if k != "PAD" or _k != "_batch_norm_stats_kernel"}
    _floats = ("negative_slope", "inv_m", "eps")
    _pointers = {**dict.fromkeys(_act, "*bf16"), "counters_ptr": "*i32"}
    for _folded in (False, True) if _k in _REDUCTIONS else (None,):
        _name = _k.strip("_") + ("-folded-finalize" if _folded else "")
        _finalize = {} if _folded is None else {"FINALIZE": _folded}
        KERNELS[_name] = ("batch_norm_act", _k, _pointers, _floats, {**_consts, **_finalize})
# the level inputs' pad and its adjoint, on the same tiles
for _name, _k, _act in (("reflection-pad", "_reflection_pad_kernel", ("x_ptr", "out_ptr")),
                        ("reflection-fold", "_reflection_fold_kernel", ("g_ptr", "dx_ptr"))):  # fmt: skip
    KERNELS[_name] = ("reflection_pad", _k, dict.fromkeys(_act, "*bf16"), (), _BN)
# the fast step's rules after the backward: float64 sums and logs, bool masks, an int64 counter
_RULES_PIXELS = {"out_ptr": "*bf16", "target_ptr": "*fp64", "iteration_ptr": "*i64", "partials_ptr": "*fp64",
                 "ring_ptr": "*i16", "sum_ptr": "*fp64", "squares_ptr": "*fp64"}  # fmt: skip
KERNELS["rules-pixels"] = ("fused_rules", "_rules_pixels_kernel", _RULES_PIXELS, ("weight", "one_minus_weight"),
                           {"HAS_TARGET": True, "WINDOW": True, "BLOCK": "_BLOCK"})  # fmt: skip
_RULES_SCALARS = {"partials_ptr": "*fp64", "accepted_ptr": "*i64", "keep_ptr": "*i1", "bad_ptr": "*i1",
                  "stopped_ptr": "*i1", "metrics_ptr": "*fp64", "iteration_ptr": "*i64"}  # fmt: skip
KERNELS["rules-scalars"] = ("fused_rules", "_rules_scalars_kernel", _RULES_SCALARS, ("factor",),
                            {"ON_PERIOD": False, "HAS_TARGET": True, "HAS_BACKTRACKING": True, "BLOCK_N": 4,
                             "BLOCK_P": 512})  # fmt: skip
_ES_OUTPUTS = {"target_ptr": "*fp64", "stopped_ptr": "*i1", "keep_ptr": "*i1", "sum_ptr": "*fp64",
               "iteration_ptr": "*i64", "partials_ptr": "*fp64"}  # fmt: skip
KERNELS["early-stop-outputs"] = ("fused_rules", "_early_stop_outputs_kernel", _ES_OUTPUTS,
                                 ("weight", "one_minus_weight"), {"HAS_TARGET": True, "WINDOW_MEAN": True,
                                                                  "BLOCK": "_BLOCK"})  # fmt: skip
_ES_SCALARS = {"partials_ptr": "*fp64", "iteration_ptr": "*i64", "minimum_iteration_ptr": "*i64",
               "best_iteration_ptr": "*i64", "stopped_ptr": "*i1", "stop_iteration_ptr": "*i64",
               "gate_open_ptr": "*i1", "keep_ptr": "*i1"}  # fmt: skip
KERNELS["early-stop-scalars"] = ("fused_rules", "_early_stop_scalars_kernel", _ES_SCALARS,
                                 ("one_minus_threshold", "one_plus_tolerance", "smoothing"),
                                 {"HAS_GATE": True, "HAS_TOLERANCE": True, "BLOCK_N": 4, "BLOCK_P": 512})  # fmt: skip
_COPY_ROWS = {f"{kind}{k}": "*i1" if kind == "m" else _FP32 for kind in "dsm" for k in range(6)}
KERNELS["copy-rows"] = ("fused_rules", "_copy_rows_kernel", _COPY_ROWS, (), {"BLOCK": "_ROW_BLOCK"})
# the check can fail: a channel count passed as a pointer has no modulo
KERNELS["broken"] = ("bilinear_x2", "_upsample_kernel", {"x": _FP32, "out": _FP32, "C": _FP32}, (), _UPSAMPLE)

_SCRIPT = textwrap.dedent(
    """
    import importlib, json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = {}
    for name, (module, kernel, pointers, floats, constexprs) in json.loads(sys.stdin.read()).items():
        mod = importlib.import_module("dipfast.kernels." + module)
        fn = getattr(mod, kernel)
        constants = {k: getattr(mod, v) if isinstance(v, str) else v for k, v in constexprs.items()}

        def kind(name):  # a named pointer's type; any other *_ptr an fp32 pointer; a named float; else an i32
            return pointers.get(name, "*fp32" if name.endswith("_ptr") else "fp32" if name in floats else "i32")

        signature = {p.name: "constexpr" if p.is_constexpr else kind(p.name) for p in fn.params}
        takes_pdl = "PDL" in signature

        def build(pdl):
            pdl_constant = {"PDL": pdl} if takes_pdl else {}
            source = ASTSource(fn=fn, signature=signature, constexprs={**constants, **pdl_constant})
            return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"launch_pdl": pdl})

        def memory_first(ptx):  # where the first global load, store or atomic is, and where the wait is
            found = (ptx.find(op) for op in ("ld.global", "st.global", "atom.global", "red.global"))
            return min((at for at in found if at >= 0), default=len(ptx)), ptx.find("griddepcontrol.wait")

        def arrival(ptx):  # the atomics, and whether a barrier separates the first from the stores before it
            atom = ptx.find("atom.global")
            line = ptx[atom : ptx.find(";", atom)]
            barrier = ptx.rfind("bar.sync", 0, atom)
            return {"atomics": ptx.count("atom.global"), "acq_rel_gpu": ".acq_rel" in line and ".gpu" in line,
                    "barrier_after_stores": ptx.rfind("st.global", 0, atom) < barrier}

        try:
            asm = build(False).asm
            results[name] = {"ok": bool(asm["cubin"]), "sm90": ".target sm_90" in asm["ptx"], "takes_pdl": takes_pdl,
                             "waits_without_pdl": asm["ptx"].count("griddepcontrol"), **arrival(asm["ptx"])}
            if takes_pdl:
                dependent = build(True)
                first_memory, wait = memory_first(dependent.asm["ptx"])
                results[name].update(waits=dependent.asm["ptx"].count("griddepcontrol.wait"),
                                     wait_before_memory=0 <= wait < first_memory,
                                     launch_pdl=dependent.metadata.launch_pdl)
        except Exception as error:
            results[name] = {"ok": False, "error": (str(error).splitlines() or [type(error).__name__])[0][:300]}
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT], input=json.dumps(KERNELS), env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    if done.returncode != 0:
        raise AssertionError(f"the compile process failed: {done.stderr[-2000:]}")
    results = json.loads(done.stdout.strip().splitlines()[-1])
    errors = [r.get("error", "") for r in results.values()]
    if all("ptxas" in e or "backend" in e.lower() for e in errors if e) and not any(r["ok"] for r in results.values()):
        pytest.skip(f"triton cannot compile for sm_90 here: {errors[0]}")
    return results


@pytest.mark.parametrize("name", [k for k in KERNELS if k != "broken"])
def test_each_kernel_compiles_for_sm90(compiled, name):
    result = compiled[name]
    assert result["ok"] and result["sm90"], result


@pytest.mark.parametrize("name", [k for k in KERNELS if k != "broken"])
def test_each_kernel_waits_for_the_kernel_before_it_ahead_of_any_memory_access(compiled, name):
    """Under programmatic dependent launch (dipfast.kernels.dependent_launch) a kernel may start before the one before
    it has finished: its one griddepcontrol.wait must come before its first global load, store or atomic, where the
    launch carries the attribute, and be absent otherwise."""
    result = compiled[name]
    assert result["takes_pdl"], f"{name} takes no PDL constexpr"
    assert result["waits"] == 1 and result["wait_before_memory"] and result["launch_pdl"], result
    assert result["waits_without_pdl"] == 0, result


@pytest.mark.parametrize("name", [k for k in KERNELS if "batch_norm" in k])
def test_a_folded_finalize_counts_arrivals_after_a_barrier(compiled, name):
    """With the finalize folded (channel_sums.last_to_arrive), each program's one atomic increment, acq_rel at GPU
    scope, comes after a barrier that follows its partial stores: one thread's release then covers every thread's
    stores (Triton puts no barrier before a scalar atomic). Without it, no atomic at all."""
    result = compiled[name]
    if name.endswith("-folded-finalize"):
        assert result["atomics"] == 1 and result["acq_rel_gpu"] and result["barrier_after_stores"], result
    else:
        assert result["atomics"] == 0, result


def test_a_kernel_the_gpu_compiler_refuses_fails_here(compiled):
    assert not compiled["broken"]["ok"] and compiled["broken"]["error"]
