"""The retriever as a shared service, and its client.

serve(): 01_build_index.py --serve true. Any index folder (bm25 or dense) on the stdlib HTTP server, in both
peers' APIs:
    ReSearch/FlashRAG  POST /batch_search {"query": [str], "top_n": k} -> [[{"id","contents"}]]
                       POST /search {"query": str, "top_n": k} -> [{"id","contents"}]
                       ("return_score": true gives [docs, scores], as FlashRAG)
    Search-R1          POST /retrieve {"queries": [str], "topk": k, "return_scores": bool}
                         -> {"result": [[{"id","contents"}]]}, or {"result": [[{"document": {...}, "score": s}]]}
    GET /health
It listens on 127.0.0.1 unless --host says otherwise; oversized requests get 413, malformed ones 400.
http_retriever(): every stage's --retriever http://HOST:PORT (ReSearch API) or http://HOST:PORT/retrieve
(Search-R1's), so a FlashRAG E5 server on wiki-18 works too.
"""

from __future__ import annotations

import importlib
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import utils
from utils import ReSearchError

MAX_REQUEST_BYTES = 1_000_000  # a larger request body gets HTTP 413
MAX_BATCH_QUERIES = 1024  # more queries in one request get HTTP 413

engine = importlib.import_module("01_build_index")  # the index's limits: MAX_TOPK, MAX_QUERY_CHARS


def serve(args, search) -> None:
    lock = threading.Lock()  # one search at a time: bounds memory (a score array per query) and CPU
    health = {"status": "ok", "retriever": search.description, "index_dir": str(args.index_dir),
              "num_passages": search.manifest["num_passages"], "corpus": search.manifest["corpus"]}

    def queries_of(req: dict, key: str, single: bool) -> list[str]:
        q = req.get(key)
        if single:
            if not isinstance(q, str):
                raise ValueError(f'"{key}" must be a string')
            return [q]
        if not isinstance(q, list) or not all(isinstance(x, str) for x in q):
            raise ValueError(f'"{key}" must be a list of strings')
        if len(q) > MAX_BATCH_QUERIES:
            raise OverflowError(f"{len(q)} queries in one request; at most {MAX_BATCH_QUERIES}")
        return q

    def k_of(req: dict, key: str) -> int:
        k = req.get(key)
        k = args.topk if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= engine.MAX_TOPK:
            raise ValueError(f'"{key}" must be an integer from 1 to {engine.MAX_TOPK}, got {k!r}')
        return k

    def answer(path: str, req: dict):
        if path in ("/search", "/batch_search"):  # ReSearch / FlashRAG
            queries = queries_of(req, "query", single=path == "/search")
            k, with_scores = k_of(req, "top_n"), bool(req.get("return_score", False))
            with lock:
                res = search.scored(queries, k)
            docs = [[p for p, _ in row] for row in res]
            scores = [[s for _, s in row] for row in res]
            if path == "/search":
                docs, scores = docs[0], scores[0]
            return [docs, scores] if with_scores else docs
        if path == "/retrieve":  # Search-R1
            queries = queries_of(req, "queries", single=False)
            k, with_scores = k_of(req, "topk"), bool(req.get("return_scores", False))
            with lock:
                res = search.scored(queries, k)
            if with_scores:
                return {"result": [[{"document": p, "score": s} for p, s in row] for row in res]}
            return {"result": [[p for p, _ in row] for row in res]}
        raise LookupError(f"no route POST {path}; use /batch_search, /search or /retrieve")

    class Handler(BaseHTTPRequestHandler):  # the stdlib server's required hook
        protocol_version = "HTTP/1.1"
        timeout = 60  # drop stalled clients

        def send_json(self, code: int, obj) -> None:
            body = json.dumps(obj, ensure_ascii=False).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path.rstrip("/") in ("/health", ""):
                self.send_json(200, health)
            else:
                self.send_json(404, {"error": f"no route GET {self.path}; use GET /health"})

        def do_POST(self):
            try:
                n = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self.close_connection = True
                return self.send_json(411, {"error": "a Content-Length header is required"})
            if n > MAX_REQUEST_BYTES:
                self.close_connection = True
                left = n  # read what was sent (within reason) so the client sees the 413, not a reset
                while left > 0 and n <= 64 * MAX_REQUEST_BYTES:
                    got = self.rfile.read(min(left, 1 << 16))
                    if not got:
                        break
                    left -= len(got)
                return self.send_json(413, {"error": f"request body of {n} bytes; at most {MAX_REQUEST_BYTES}"})
            try:
                req = json.loads(self.rfile.read(n))
                if not isinstance(req, dict):
                    raise ValueError("the body must be a JSON object")
                self.send_json(200, answer(self.path.split("?")[0].rstrip("/"), req))
            except OverflowError as e:
                self.send_json(413, {"error": str(e)})
            except LookupError as e:
                self.send_json(404, {"error": str(e)})
            except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
                self.send_json(400, {"error": f"bad request: {e}"})
            except Exception as e:  # a bug must not take the server down
                print(f"error serving {self.path}: {e!r}", file=sys.stderr)
                self.send_json(500, {"error": f"internal error: {e!r}"})

        def log_message(self, fmt, *a):  # only failures; successful requests are too many to log
            if len(a) > 1 and not str(a[1]).startswith("2"):
                super().log_message(fmt, *a)

    try:
        server = ThreadingHTTPServer((args.host, args.port), Handler, bind_and_activate=False)
        server.request_queue_size = 1024  # the default backlog (5) resets bursts of parallel rollouts
        server.server_bind()
        server.server_activate()
    except OSError as e:
        raise ReSearchError(f"cannot serve on {args.host}:{args.port}: {e}") from e
    host, port = server.server_address[:2]
    print(f"serving {search.description} on http://{host}:{port}  (ReSearch: POST /batch_search, /search; "
          f"Search-R1: POST /retrieve; GET /health)", flush=True)
    print(f"use it with: --retriever http://{host}:{port}  or  --retriever http://{host}:{port}/retrieve", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def http_retriever(url: str, timeout: float = 60.0, retries: int = 3) -> utils.SearchFn:
    """A client for a retrieval server (01_build_index.py --serve, a FlashRAG/ReSearch server, or a
    Search-R1 server). "http://host:port" speaks ReSearch's POST /batch_search ({"query": [...],
    "top_n": k} -> [[{"id","contents"}]]); a URL ending in /retrieve speaks Search-R1's
    ({"queries", "topk", "return_scores"} -> {"result": [[{"document": {...}, "score": s}]]}); both with scores.
    Connection failures and 5xx are retried with backoff; a 4xx is our fault and raises at once."""
    url = url.rstrip("/")
    search_r1 = url.endswith("/retrieve")

    def post(path: str, payload: dict):
        data = json.dumps(payload).encode()
        last = None
        for attempt in range(retries):
            try:
                req = urllib.request.Request(path, data=data, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:  # 4xx: our request is wrong, retrying won't help
                body = e.read().decode(errors="replace")[:300]
                if 400 <= e.code < 500:
                    raise ReSearchError(f"retriever {path} rejected the request ({e.code}): {body}") from e
                last = e
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError) as e:
                last = e
            if attempt + 1 < retries:
                time.sleep(0.5 * 2**attempt)
        raise ReSearchError(f"retriever at {path} failed after {retries} tries: {last}")

    def doc(d: dict) -> dict:
        return {"id": str(d.get("id", "")), "contents": d["contents"]}

    def ask(queries: list[str], k: int, scores: bool):
        engine.check_topk(k)
        queries = [str(q)[:engine.MAX_QUERY_CHARS] for q in queries]
        if not queries:
            return []
        try:
            if search_r1:
                res = post(url, {"queries": queries, "topk": k, "return_scores": scores})["result"]
                rows = [[(doc(x["document"]), float(x["score"])) if scores else (doc(x), None) for x in row]
                        for row in res]
            elif scores:
                docs, values = post(url + "/batch_search", {"query": queries, "top_n": k, "return_score": True})
                rows = [[(doc(d), float(v)) for d, v in zip(drow, vrow)] for drow, vrow in zip(docs, values)]
            else:
                rows = [[(doc(d), None) for d in row] for row in post(url + "/batch_search", {"query": queries, "top_n": k})]
        except (KeyError, TypeError, ValueError) as e:
            raise ReSearchError(f"retriever at {url} answered in an unexpected shape ({e!r})") from e
        if len(rows) != len(queries):
            raise ReSearchError(f"retriever at {url} answered {len(rows)} result lists for {len(queries)} queries")
        return rows

    def scored(queries: list[str], k: int) -> list[list[tuple[dict, float]]]:
        """[[(passage, score)]], best first (IRCoT ranks passages by score)."""
        return ask(queries, k, scores=True)

    def search(queries: list[str], k: int) -> list[list[dict]]:
        return [[p for p, _ in row] for row in ask(queries, k, scores=False)]

    search.scored = scored  # type: ignore[attr-defined]
    search.description = f"http:{url}"  # type: ignore[attr-defined]
    return search
