"""Compile every Triton kernel of fedlr.kernels.lora_triton, in every autotune config, dtype and
flag combination, for a CUDA architecture, without a GPU (Triton ships ptxas): catches what the
interpreter cannot, code that does not lower to PTX or tiles that do not fit in shared memory.
Run with TRITON_INTERPRET unset; prints one JSON line per kernel build.
Usage: python tests/triton_compile.py CAPABILITY [--quick]   (90: H100, 80: A100; --quick: bf16
and each kernel's first config only)"""

from __future__ import annotations

import itertools
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fedlr.kernels import lora_triton

POINTERS = {
    "_forward_kernel": ["x_ptr", "w_ptr", "bias_ptr", "s_ptr", "b_ptr", "y_ptr"],
    "_dy_kernel": ["g_ptr", "b_ptr", "s_ptr", "u_ptr"],
    "_dx_kernel": ["g_ptr", "w_ptr", "u_ptr", "a_ptr", "x_ptr", "dx_ptr"],
}
FP32_ACCUMULATORS = ("db_ptr", "da_ptr")  # atomically accumulated in fp32
FLOATS = ("scale",)
FLAGS = {
    "_forward_kernel": [{"HAS_BIAS": b} for b in (True, False)],
    "_dy_kernel": [{"NEED_U": u, "NEED_DB": d} for u, d in ((True, True), (True, False),
                                                             (False, True))],
    "_dx_kernel": [{"WRITE_DX": x, "WRITE_DA": a} for x, a in ((True, True), (True, False),
                                                               (False, True))],
}
DTYPES = {"bf16": "tf32", "fp16": "tf32", "fp32": "ieee"}  # operand type: dot precision


def build(kernel, dtype: str, constexprs: dict, config: triton.Config, target: GPUTarget) -> dict:
    fn = kernel.fn
    constants = {**constexprs, **config.kwargs}
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in POINTERS[fn.__name__]:
            signature[name] = f"*{dtype}"
        elif name in FP32_ACCUMULATORS:
            signature[name] = "*fp32"
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    compiled = triton.compile(ASTSource(fn, signature, constants), target=target, options=options)
    return {"kernel": fn.__name__, "dtype": dtype, **constexprs, **config.kwargs,
            "num_warps": config.num_warps, "num_stages": config.num_stages,
            "shared_bytes": compiled.metadata.shared, "cubin": "cubin" in compiled.asm}


def main(capability: int, quick: bool) -> None:
    target = GPUTarget("cuda", capability, 32)
    for name, flag_sets in FLAGS.items():
        kernel = getattr(lora_triton, name)
        dtypes, configs = (["bf16"], kernel.configs[:1]) if quick else (DTYPES, kernel.configs)
        for dtype, flags, config in itertools.product(dtypes, flag_sets, configs):
            constexprs = {"BLOCK_R": 16, "UPCAST": False, "PRECISION": DTYPES[dtype], **flags}
            print(json.dumps(build(kernel, dtype, constexprs, config, target)), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), "--quick" in sys.argv[2:])
