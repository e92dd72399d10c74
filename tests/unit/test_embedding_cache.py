"""The routers' memo of query embeddings is bounded in bytes (MOERGE_EMBED_CACHE_MB), keys included: a query
can be long, so a bound on the number of entries bounds nothing. Least recently used goes first; an entry
larger than the whole bound is not kept. On the real all-MiniLM-L6-v2 (torch path: no export needed)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from routers.query.embedder import MB, LazyEmbedder, SentenceEmbedder, default_embedding_model

QUERY_CHARS = 64 * 1024  # a 64 KiB query: sixteen of them fill a 1 MiB memo


def long_query(i: int) -> str:
    head = f"Query {i}: summarise this report. "
    return head + "x" * (QUERY_CHARS - len(head))


@pytest.fixture(scope="module")
def embedder() -> Iterator[SentenceEmbedder]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the two cores are shared; one thread is faster here than two fighting
    try:
        yield SentenceEmbedder(default_embedding_model(), backend="torch", cache_mb=1)
    finally:
        torch.set_num_threads(threads)


def test_many_long_queries_keep_the_memo_under_its_bound(embedder: SentenceEmbedder) -> None:
    embedder.set_cache_mb(1)
    for i in range(40):  # 2.5 MiB of distinct queries
        embedder.encode([long_query(i)])
        assert embedder.cache_bytes <= MB
    kept = list(embedder._cache)
    assert 0 < len(kept) < 40
    assert kept == [long_query(i) for i in range(40 - len(kept), 40)]  # the most recent ones


def test_a_recently_used_query_outlives_older_ones(embedder: SentenceEmbedder) -> None:
    embedder.set_cache_mb(1)
    favourite = long_query(1000)
    first = embedder.encode([favourite])[0]
    for i in range(40):
        again = embedder.encode([favourite, long_query(2000 + i)])[0]
        np.testing.assert_array_equal(again, first)  # served from the memo, the same vector
    assert favourite in embedder._cache
    assert long_query(2000) not in embedder._cache
    assert embedder.cache_bytes <= MB


def test_an_entry_larger_than_the_bound_is_not_kept(embedder: SentenceEmbedder) -> None:
    embedder.set_cache_mb(1)
    embedder.encode(["a short query"])
    before = embedder.cache_bytes
    huge = "y" * (2 * MB)
    vector = embedder.encode([huge])[0]
    assert vector.shape == (embedder.dim,)
    assert huge not in embedder._cache and "a short query" in embedder._cache  # nothing else evicted for it
    assert embedder.cache_bytes == before


def test_a_smaller_bound_trims_at_once_and_zero_keeps_nothing(embedder: SentenceEmbedder) -> None:
    embedder.set_cache_mb(1)
    embedder.encode([long_query(i) for i in range(3000, 3010)])
    embedder.set_cache_mb(0.25)
    assert 0 < embedder.cache_bytes <= MB // 4
    embedder.set_cache_mb(0)
    embedder.encode(["one more"])
    assert embedder.cache_bytes == 0 and not embedder._cache
    with pytest.raises(ValueError, match="MOERGE_EMBED_CACHE_MB"):
        embedder.set_cache_mb(-1)


def test_the_apps_embedder_takes_the_setting() -> None:
    lazy = LazyEmbedder(default_embedding_model(), "torch", cache_mb=0.5)
    lazy.encode([long_query(i) for i in range(4000, 4012)])
    assert 0 < lazy.embedder.cache_bytes <= MB // 2
