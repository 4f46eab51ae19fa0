"""Shared fixtures. Everything runs on the CPU, offline. Unit tests use a tiny random Llama with the
real SmolLM2 tokenizer (fast, same token layout); the real small model only where it matters."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import utils  # noqa: E402


def run_script(*args, check=True, timeout=900, env=None):
    """Run one of the numbered scripts as a user would, from the repo root; returns CompletedProcess."""
    import os
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    full_env.update(env or {})
    p = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=full_env)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}")
    return p


@pytest.fixture(scope="session")
def tokenizer():
    return utils.load_tokenizer(utils.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A 2-layer, 64-wide random Llama with SmolLM2's vocabulary and tokenizer, saved like any
    checkpoint so scripts accept it as --model."""
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    return utils.load_model(tiny_model_dir, device="cpu")


def load_stage(filename: str, name: str):
    """A numbered script as a module (its name starts with a digit, so no plain import)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, ROOT / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def load_build_index_module():
    """01_build_index.py as a module, loaded once (utils.load_retriever imports it as "01_build_index")."""
    import importlib
    return importlib.import_module("01_build_index")


@pytest.fixture(scope="session")
def mini_index(tmp_path_factory):
    """Path of a bm25s index over data/mini/corpus.jsonl with the default settings: runs/index_mini
    when its manifest matches the corpus sha256 and the default settings (read only, never
    rebuilt here), else one built by 01_build_index.py into a temp folder (~5 s)."""
    corpus = ROOT / "data" / "mini" / "corpus.jsonl"
    existing = ROOT / "runs" / "index_mini"
    build_index = load_build_index_module()
    defaults = build_index.bm25_settings(build_index.IndexArguments(corpus=str(corpus)))
    try:
        manifest = build_index.read_manifest(existing)
        if manifest["corpus_sha256"] == build_index.file_sha256(corpus) and all(
                manifest.get(k) == v for k, v in defaults.items() if k != "bm25s_version"):
            return str(existing)
    except (utils.ReSearchError, KeyError):
        pass
    out = tmp_path_factory.mktemp("index") / "index_mini"
    run_script("01_build_index.py", "--corpus", corpus, "--index_dir", out, timeout=300)
    return str(out)
