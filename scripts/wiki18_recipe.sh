#!/usr/bin/env bash
# The wiki-18 recipe: the paper's retrieval corpus (Wikipedia Dec 2018, DPR's 21,015,324 passages of
# 100 words, in FlashRAG / Search-R1 form {"id", "contents": "\"Title\"\ntext"}) -> a BM25 index
# (and optionally the paper's dense E5 index), plus the train/dev question sets from the hub.
#
#   bash scripts/wiki18_recipe.sh download     # fetch wiki-18.jsonl.gz (several GB) + question sets (needs internet)
#   bash scripts/wiki18_recipe.sh bm25         # build runs/index_wiki18 from data/wiki18/wiki-18.jsonl.gz
#   bash scripts/wiki18_recipe.sh dense        # build runs/index_wiki18_e5 (intfloat/e5-base-v2; wants a GPU)
#   bash scripts/wiki18_recipe.sh serve        # serve the BM25 index to trainers on other machines
# Variables: WIKI18 (corpus path), INDEX_DIR, DENSE_DIR, PY (python), HOST, PORT.
#
# Where the corpus is published (the same file):
#   Search-R1:  https://huggingface.co/datasets/PeterJinGo/wiki-18-corpus  (wiki-18.jsonl.gz)
#   FlashRAG:   https://huggingface.co/datasets/RUC-NLPIR/FlashRAG_datasets  (folder retrieval-corpus/,
#               wiki18_100w: the same DPR split; unzip it to a .jsonl and pass it as WIKI18)
#   Origin:     DPR's psgs_w100.tsv.gz, https://dl.fbaipublicfiles.com/dpr/wikipedia_split/psgs_w100.tsv.gz
#               (tsv id/text/title: convert to {"id","title","text"} lines, which 01_build_index.py accepts)
#
# Costs, from BENCHMARKS.md (measured at 1M passages on a 2-core VM and scaled; not run on wiki-18 here):
#   BM25 build: ~45-80 min on one core; ~3-4 GB of heap; ~30 GB of disk while building, ~23 GB after.
#   BM25 queries: ~3-7 queries/s per process (run several servers for GRPO at paper scale).
#   Dense e5-base-v2, flat: 21M x 768 x 4 B = 65 GB of vectors on disk and in RAM (or GPU) to search;
#   hnsw adds ~5 GB of graph and takes many CPU-hours to build; encoding 21M passages is ~1-3 GPU-hours
#   on an A100 (projected from sentence-transformers throughput, not measured here).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
WIKI18=${WIKI18:-data/wiki18/wiki-18.jsonl.gz}
INDEX_DIR=${INDEX_DIR:-runs/index_wiki18}
DENSE_DIR=${DENSE_DIR:-runs/index_wiki18_e5}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
step=${1:-bm25}

need_corpus() {
  if [[ ! -f "$WIKI18" ]]; then
    echo "error: no wiki-18 corpus at $WIKI18" >&2
    echo "  get it with:  bash scripts/wiki18_recipe.sh download   (needs internet)" >&2
    echo "  or download https://huggingface.co/datasets/PeterJinGo/wiki-18-corpus/resolve/main/wiki-18.jsonl.gz" >&2
    echo "  and pass its path:  WIKI18=/path/to/wiki-18.jsonl.gz bash scripts/wiki18_recipe.sh $step" >&2
    exit 2
  fi
}

need_disk() {  # $1 = GB wanted free where $2 goes
  local dir free
  dir=$(dirname "$2"); mkdir -p "$dir"
  free=$(df -Pk "$dir" | awk 'NR==2 {print int($4 / 1048576)}')
  if (( free < $1 )); then
    echo "error: $dir has ${free} GB free; the build needs ~$1 GB (see BENCHMARKS.md)" >&2
    exit 2
  fi
}

case "$step" in
  download)
    mkdir -p data/wiki18
    # The corpus (Search-R1's hub copy).
    "$PY" - <<'PYEOF'
from huggingface_hub import hf_hub_download
p = hf_hub_download("PeterJinGo/wiki-18-corpus", "wiki-18.jsonl.gz", repo_type="dataset", local_dir="data/wiki18")
print("corpus:", p)
PYEOF
    # The question sets, FlashRAG's jsonl (what utils.load_questions reads by name, e.g.
    # --dataset musique; saved here so runs do not depend on the hub). Rough sizes: musique train
    # 19,938 (the paper trains on it), dev 2,417; hotpotqa train 90,447, dev 7,405; 2wikimultihopqa
    # train 15,000, dev 12,576; bamboogle test 125. Tens of MB each at most.
    "$PY" - <<'PYEOF'
import json, os, utils
os.makedirs("data/hub", exist_ok=True)
for name, split in [("musique", "train"), ("musique", "dev"), ("hotpotqa", "train"), ("hotpotqa", "dev"),
                    ("2wikimultihopqa", "dev"), ("bamboogle", "test")]:
    rows = utils.load_questions(name, split=split)
    out = f"data/hub/{name}_{split}.jsonl"
    with open(out + ".tmp", "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(out + ".tmp", out)
    print(f"{out}: {len(rows)} questions")
PYEOF
    ;;
  bm25)
    need_corpus
    need_disk 35 "$INDEX_DIR"
    # Time, peak RSS and size are recorded in $INDEX_DIR/manifest.json (build_seconds, build_peak_rss_mb, index_bytes).
    "$PY" 01_build_index.py --corpus "$WIKI18" --index_dir "$INDEX_DIR" --low_memory true
    "$PY" 01_build_index.py --index_dir "$INDEX_DIR" --query "Were Scott Derrickson and Ed Wood of the same nationality?"
    ;;
  dense)
    need_corpus
    need_disk 80 "$DENSE_DIR"
    # Flat (exact) for searching on a GPU with faiss-gpu (--faiss_gpu true when serving); use
    # --faiss_index hnsw for CPU search (much longer build).
    "$PY" 01_build_index.py --corpus "$WIKI18" --index_dir "$DENSE_DIR" \
      --encoder intfloat/e5-base-v2 --encode_batch_size 512 --chunk_passages 200000 \
      --faiss_index "${FAISS_INDEX:-flat}"
    ;;
  serve)
    # Binds to $HOST (default loopback). HOST=0.0.0.0 exposes it to the network: only on a trusted one.
    exec "$PY" 01_build_index.py --index_dir "$INDEX_DIR" --serve --host "$HOST" --port "$PORT"
    ;;
  *)
    echo "usage: bash scripts/wiki18_recipe.sh download|bm25|dense|serve" >&2
    exit 2
    ;;
esac
