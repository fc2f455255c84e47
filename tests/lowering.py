"""Lower Triton kernels to sm_90 (H100) cubins with Triton's compiler and ptxas, no GPU needed.

The interpreter accepts code the compiler rejects (non-constexpr globals, type mismatches, bad
layouts), so each kernel module has a test that lowers its kernels in a fresh process without
TRITON_INTERPRET. The script given to `assert_lowers` calls `lower(jit_function, args)`, where args
maps every kernel argument, in order, to a Triton type string ("*bf16", "i32", "fp32"), None (an
absent pointer) or a constexpr value (a string constexpr as tl.constexpr("tf32")).
"""
import os
import subprocess
import sys

PRELUDE = """
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def lower(kernel, args, num_warps=8, num_stages=3):
    names = list(kernel.arg_names)
    assert list(args) == names, (kernel.__name__, set(names) ^ set(args))
    signature = {n: v if isinstance(v, str) else "constexpr" for n, v in args.items()}
    constexprs = {(names.index(n),): v.value if isinstance(v, tl.constexpr) else v
                  for n, v in args.items() if not isinstance(v, str)}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    assert compiled.asm["cubin"], kernel.__name__
    print(kernel.__name__, "ok")
"""


def assert_lowers(script: str, n_kernels: int) -> None:
    """Runs PRELUDE + script in a fresh interpreter-free process; it must print n_kernels "ok" lines."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", PRELUDE + script], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count(" ok\n") == n_kernels, proc.stdout
