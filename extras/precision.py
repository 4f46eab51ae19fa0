"""--dtype auto: bfloat16 where this machine computes it natively, float32 elsewhere.

On a CPU with AMX or AVX-512 BF16 (torch.cpu.get_capabilities() names them), bf16 matmuls run in hardware:
measured here, a SmolLM2 forward 2.5x and forward + backward 1.9x faster than float32. Other CPUs emulate
bf16, slower than float32. Measure any machine with benchmarks/bench_cpu_precision.py (fp32 vs auto, same
rows, one run)."""


def native_bf16() -> tuple[bool, str]:
    """Whether bfloat16 is fast here, and why: a GPU that has it, or a CPU with AMX or AVX-512 BF16."""
    import torch
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported(), f"GPU {torch.cuda.get_device_name()}"
    capabilities = torch.cpu.get_capabilities()
    native = [name for name in ("amx_bf16", "avx512_bf16") if capabilities.get(name)]
    if native:
        return True, f"this CPU has {' and '.join(native)}"
    return False, "this CPU has neither amx_bf16 nor avx512_bf16 (bf16 would be emulated, slower than float32)"


def choose_dtype(dtype: str) -> str:
    """--dtype auto -> bfloat16 where it is native, else float32; any other value as given."""
    if dtype != "auto":
        return dtype
    if native_bf16()[0]:
        return "bfloat16"
    return "float32"


def precision_plan(dtype: str, use_lora: bool, targs) -> dict:
    """03: which weights are in which precision. auto: float32 master weights and optimizer (a 1e-6 step is
    below bf16's resolution), trained under bf16 autocast where it is native (--bf16); a LoRA base (frozen)
    in bf16 there; on a CPU with native bf16 the rollouts sample from a bf16 copy and the reference is bf16."""
    import torch
    native, why = native_bf16()
    policy = choose_dtype(dtype)
    if dtype == "auto" and not use_lora:
        policy = "float32"
    bf16_inference = dtype == "auto" and native and not torch.cuda.is_available()
    plan = {"policy": policy, "autocast": "bf16" if targs.bf16 else "off", "rollouts": policy,
            "reference": policy, "why": why}
    if bf16_inference and policy == "float32" and not targs.use_vllm:
        plan["rollouts"] = "bfloat16 copy"
    if targs.use_vllm:  # TRL builds the engine with vLLM's dtype "auto": a float32 checkpoint runs in bf16
        plan["rollouts"] = "vLLM engine (dtype auto)"
    if bf16_inference and not use_lora:
        plan["reference"] = "bfloat16"
    return plan
