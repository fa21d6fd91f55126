"""Command-line verbs of the evaluation suite: ``vismem eval``."""
from __future__ import annotations


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a memory against labelled query embeddings",
        description="One retrieval pass at --k-max through the fan-out layer, then every figure from the "
        "same neighbour lists: top-1 accuracy of every voting rule at every k (best k on the evaluation "
        "set, and the honest figure with k and alpha/tau/xi chosen on a held-out half of the queries), "
        "hit rate, neighbour reliability with its log fit, calibration, distances to the first 100 "
        "neighbours (in- vs out-of-distribution with --ood) and hyper-parameter sweeps. Writes "
        "metrics.jsonl, PNG plots and report.md under --out.",
        epilog="example: vismem eval /data/fmnist-memory test.parquet --out eval-out --k-max 100",
    )
    p.add_argument("memory", help="memory directory or gs:// URL")
    p.add_argument("queries", help="embedding shard (Parquet) of labelled query embeddings")
    p.add_argument("--out", required=True, help="output directory for report.md, metrics.jsonl, plots")
    p.add_argument("--k-max", type=int, default=100, help="neighbours retrieved once per query (default 100)")
    p.add_argument("--ood", default=None, help="embedding shard of out-of-distribution queries (distances plot)")
    p.add_argument("--batch-size", type=int, default=4096, help="queries per search batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    p.add_argument("--version", type=int, default=None, help="memory version to pin (default latest)")
    p.add_argument("--rerank-endpoint", default=None,
                   help="chat-completions URL of a vision-language model to re-rank neighbours (key from "
                   "$VISMEM_RERANK_API_KEY)")
    p.add_argument("--rerank-model", default=None, help="model name sent to the re-ranker")
    p.add_argument("--rerank-k", type=int, default=50, help="neighbours shown to the re-ranker")
    p.add_argument("--rerank-queries", type=int, default=200, help="queries sent to the re-ranker")
    p.add_argument("--probe-shards", type=int, default=None,
                   help="k-means memories: search each query only in its P nearest shards (default: all)")
    p.add_argument("--ray-address", default=None,
                   help="host the shards in Ray actors on this cluster (e.g. ray://head:10001, or 'local')")

    def run(a):
        from eval.evaluate import evaluate
        from eval.rerank import HttpVisionLanguageReranker

        reranker = None
        if a.rerank_endpoint:
            if not a.rerank_model:
                raise ValueError("--rerank-endpoint needs --rerank-model")
            reranker = HttpVisionLanguageReranker(a.rerank_endpoint, a.rerank_model)
        return evaluate(a.memory, a.queries, a.out, k_max=a.k_max, ood_queries_path=a.ood,
                        batch_size=a.batch_size, seed=a.seed, version=a.version, ray_address=a.ray_address,
                        reranker=reranker, rerank_k=a.rerank_k, rerank_queries=a.rerank_queries,
                        probe_shards=a.probe_shards)

    p.set_defaults(func=run)
