"""faiss indexes mirroring a layer's memory keys (Flat exact, IVF/HNSW approximate): the `reading.index` values other
than `torch`. Searches return raw inner products, as `retrieval.topk_exact` does."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from unimem_bench.methods.config import Reading


class FaissBank:
    """faiss indexes mirroring one layer's memory keys, one index per (batch row, KV head).

    Internal faiss ids are sequential from `base_id`, the memory-wide id of the first key indexed; a search is
    restricted to the live id range with an IDSelectorRange, so FIFO eviction costs nothing until the index holds
    twice the memory, when it is rebuilt from the bank (amortised O(1) per written key).
    """

    def __init__(self, reading: Reading, capacity: int) -> None:
        import faiss  # imported here: only runs that ask for a faiss index pay for it

        self.faiss = faiss
        self.reading = reading
        self.capacity = max(capacity, 1)
        self.indexes: list[list[Any]] = []  # faiss indexes (faiss has no type information)
        self.base_id = 0
        self.count = 0
        self.trained_on = 0

    def _new_index(self, dim: int, train: np.ndarray) -> Any:
        faiss, r = self.faiss, self.reading
        if r.index == "faiss-flat":
            return faiss.IndexFlatIP(dim)
        if r.index == "faiss-hnsw":
            return faiss.IndexHNSWFlat(dim, r.hnsw_neighbors, faiss.METRIC_INNER_PRODUCT)
        # faiss wants at least 39 training points per IVF cell; below that one cell is a flat index anyway.
        lists = min(r.ivf_lists, len(train) // 39)
        if lists < 2:
            return faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.train(train)
        return index

    def rebuild(self, keys: torch.Tensor, first_id: int) -> None:
        """Index the bank's keys [batch, kv_heads, n, dim] afresh; their ids start at `first_id`."""
        batch, heads, n, dim = keys.shape
        data = keys.detach().float().cpu().numpy()
        self.indexes = []
        for b in range(batch):
            row = []
            for h in range(heads):
                index = self._new_index(dim, np.ascontiguousarray(data[b, h]))
                index.add(np.ascontiguousarray(data[b, h]))
                row.append(index)
            self.indexes.append(row)
        self.base_id, self.count, self.trained_on = first_id, n, n

    def add(self, new_keys: torch.Tensor, new_first_id: int, bank_keys: torch.Tensor, first_id: int) -> None:
        """Mirror a write: `new_keys` (ids from `new_first_id`) joined the bank, which now holds `bank_keys` (ids
        from `first_id`)."""
        stale = self.count + new_keys.shape[2] > 2 * self.capacity
        # An IVF quantiser trained on a small early memory splits a 4x larger one badly: retrain it.
        retrain = self.reading.index == "faiss-ivf" and bank_keys.shape[2] >= 4 * max(self.trained_on, 1)
        gap = new_first_id != self.base_id + self.count
        if not self.indexes or stale or retrain or gap:
            self.rebuild(bank_keys, first_id)
            return
        data = new_keys.detach().float().cpu().numpy()
        for b, row in enumerate(self.indexes):
            for h, index in enumerate(row):
                index.add(np.ascontiguousarray(data[b, h]))
        self.count += new_keys.shape[2]

    def search(self, queries: torch.Tensor, k: int, first_id: int, start: int, stop: int) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
        """Top-k over the bank entries [start, stop) (bank slot 0 has memory id first_id).

        queries [batch, kv_heads, q, dim] -> (scores, bank indices) [batch, kv_heads, q, k]; index -1 and score
        -inf where an approximate index found fewer than k.
        """
        faiss, r = self.faiss, self.reading
        lo = first_id - self.base_id
        selector = faiss.IDSelectorRange(lo + start, lo + stop)
        if r.index == "faiss-ivf":
            params = faiss.SearchParametersIVF(sel=selector, nprobe=r.ivf_probe)
        elif r.index == "faiss-hnsw":
            # efSearch below k cannot return k results; 64 is faiss' usual floor for good recall.
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(2 * k, 64))
        else:
            params = faiss.SearchParameters(sel=selector)
        batch, heads, q, _ = queries.shape
        data = queries.detach().float().cpu().numpy()
        scores = np.empty((batch, heads, q, k), dtype=np.float32)
        ids = np.empty((batch, heads, q, k), dtype=np.int64)
        for b, row in enumerate(self.indexes):
            for h, index in enumerate(row):
                scores[b, h], ids[b, h] = index.search(np.ascontiguousarray(data[b, h]), k, params=params)
        found = torch.from_numpy(ids) >= 0
        idx = torch.where(found, torch.from_numpy(ids) - lo, -1).to(queries.device)
        out = torch.from_numpy(scores).to(device=queries.device, dtype=queries.dtype)
        return out.masked_fill(~found.to(queries.device), float("-inf")), idx

    def select_rows(self, rows: list[int]) -> None:
        self.indexes = [self.indexes[i] for i in rows]
