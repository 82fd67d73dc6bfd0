"""Reading at the output distribution: kNN-LM and TRIME map memory into the vocabulary (UniMem Table 1).

A memory entry is (key, next token): the key is the last decoder layer's FFN input (kNN-LM's and TRIME's choice),
taken by a forward pre-hook on that layer's MLP, so no modeling code is copied. The document's own datastore
grows segment by segment with every token whose next token is known (a segment's last token waits for the next
segment's first); an external datastore is built once from a corpus (`corpus_datastore`). Each segment searches
each row's datastore once, batched over its queries.

- kNN-LM (Khandelwal et al., 2020): p = lambda p_kNN + (1 - lambda) p_LM, with p_kNN(w) the softmax of -d / T
  over the k nearest entries (squared L2 distance d) summed over the entries of token w.
- TRIME (Zhong et al., 2022): p(w) proportional to exp(E_w . h) + sum over memory entries j of token w of
  exp(g . g_j / sqrt(dim) / T): local memory (the segment's earlier tokens, dense, as TRIME's in-batch memory),
  long memory (the document's previous segments) and external memory (the corpus), the last two by top-k.

`OutputReader.read` returns log-probabilities [batch, n, vocab] in place of logits: cross-entropy, argmax and the
sampler's softmax of them are those of the mixture.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from unimem_bench.methods.config import Reading, UniMemConfig
from unimem_bench.methods.engine.retrieval import best_first, top_in_key_order

# Keys scored per step of the exact torch search (bounds the [queries x chunk] distance block).
SEARCH_CHUNK = 16384


class FfnInputTap:
    """Keeps the input of the last decoder layer's MLP (the post-attention-norm hidden state) of the latest call."""

    def __init__(self, decoder: nn.Module) -> None:
        last = list(decoder.get_submodule("layers").children())[-1]
        self.value: torch.Tensor | None = None
        self.handle = last.get_submodule("mlp").register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.value = args[0]  # [batch, seq, hidden]

    def take(self) -> torch.Tensor:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError("internal: the last layer's MLP did not run")
        return value

    def remove(self) -> None:
        self.handle.remove()


class Datastore:
    """(key, next token) pairs searched by negative squared L2 distance (`l2`) or inner product (`ip`).

    `torch` searches exactly by matrix product (ties to the older entry, as `retrieval.topk_exact`); `faiss-flat`
    exactly with faiss; `faiss-ivf` exactly by matrix product until the datastore holds 39 keys per IVF cell (faiss'
    minimum to train), then with an IVF index trained on the keys held at that moment; `faiss-hnsw` with an HNSW
    graph.
    """

    def __init__(self, reading: Reading, metric: str, dim: int) -> None:
        self.reading, self.metric, self.dim = reading, metric, dim
        self._keys = torch.zeros(0, dim)  # [capacity, dim] float32, CPU; the first `len(self)` rows are held
        self._values = torch.zeros(0, dtype=torch.long)  # [capacity]
        self.size = 0
        self.index: Any = None  # a faiss index mirroring `keys`, or None for the exact torch search

    def __len__(self) -> int:
        return self.size

    @property
    def keys(self) -> torch.Tensor:
        """[n, dim] the keys held."""
        return self._keys[:self.size]

    @property
    def values(self) -> torch.Tensor:
        """[n] the next token of each key."""
        return self._values[:self.size]

    def add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append keys [n, dim] with their next tokens [n] (storage doubles when full: amortised O(1) per key)."""
        keys = keys.detach().float().cpu()
        n = self.size + len(keys)
        if n > len(self._keys):
            capacity = max(n, 2 * len(self._keys), 1024)
            self._keys = torch.cat([self.keys, torch.zeros(capacity - self.size, self.dim)])
            self._values = torch.cat([self.values, torch.zeros(capacity - self.size, dtype=torch.long)])
        self._keys[self.size:n] = keys
        self._values[self.size:n] = values.detach().cpu().long()
        self.size = n
        r = self.reading
        if self.index is not None:
            self.index.add(keys.numpy())
        elif r.index in ("faiss-flat", "faiss-hnsw") or (r.index == "faiss-ivf" and n >= 39 * r.ivf_lists):
            self.index = self._new_index()
            self.index.add(self.keys.numpy())

    def _new_index(self) -> Any:
        import faiss  # imported here: only faiss-backed datastores pay for it

        r, dim = self.reading, self.dim
        metric = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        if r.index == "faiss-ivf":
            index = faiss.IndexIVFFlat(faiss.IndexFlat(dim, metric), dim, r.ivf_lists, metric)
            index.train(self.keys.numpy())
            index.nprobe = r.ivf_probe
            return index
        if r.index == "faiss-hnsw":
            return faiss.IndexHNSWFlat(dim, r.hnsw_neighbors, metric)
        return faiss.IndexFlat(dim, metric)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The best min(k, n) entries per query [q, dim]: (scores, tokens), each [q, min(k, n)], best first; the
        score is -squared distance (l2) or the inner product (ip), -inf where faiss found fewer."""
        k = min(k, len(self))
        q = queries.detach().float().cpu()
        if self.index is not None:
            found, ids = self.index.search(np.ascontiguousarray(q.numpy()), k)
            scores = torch.from_numpy(found)
            scores = -scores if self.metric == "l2" else scores
            ids_t = torch.from_numpy(ids).long()
            scores = scores.masked_fill(ids_t < 0, float("-inf"))
            return scores, self.values[ids_t.clamp_min(0)]
        best: tuple[torch.Tensor, torch.Tensor] | None = None
        q_norms = (q * q).sum(-1, keepdim=True) if self.metric == "l2" else None  # [q, 1]
        for lo in range(0, len(self), SEARCH_CHUNK):
            block = self.keys[lo:lo + SEARCH_CHUNK]
            scores = q @ block.T  # [q, chunk]
            if q_norms is not None:  # 2 q.k - |q|^2 - |k|^2, in place
                scores.mul_(2).sub_(q_norms).sub_((block * block).sum(-1))
            top, idx = top_in_key_order(scores, min(k, block.shape[0]))  # in key order: ties go to the older entry
            idx = idx + lo
            if best is not None:
                top, pick = top_in_key_order(torch.cat([best[0], top], -1), k)
                idx = torch.cat([best[1], idx], -1).gather(-1, pick)
            best = (top, idx)
        assert best is not None
        top, idx = best_first(*best)
        return top, self.values[idx]


def _is_ivf(index: Any) -> bool:
    return hasattr(index, "nprobe")


class OutputState:
    """The output memory of a batch of documents streamed in lockstep: one datastore per row, the pending last key
    of each row's previous segment (its next token is the next segment's first), and the shared external store."""

    def __init__(self, rows: list[Datastore], external: Datastore | None) -> None:
        self.rows = rows
        self.external = external
        self.pending: torch.Tensor | None = None  # [batch, dim]

    def select_rows(self, rows: torch.Tensor) -> None:
        self.rows = [self.rows[int(i)] for i in rows]
        if self.pending is not None:
            self.pending = self.pending.index_select(0, rows.to(self.pending.device))

    def admit_pending(self, first_ids: torch.Tensor) -> None:
        """The previous segment's last key joins each row's datastore with its next token `first_ids` [batch]."""
        if self.pending is None:
            return
        for row, store in enumerate(self.rows):
            store.add(self.pending[row:row + 1], first_ids[row:row + 1])
        self.pending = None

    def state_dict(self) -> dict[str, Any]:
        return {"keys": [s.keys for s in self.rows], "values": [s.values for s in self.rows],
                "pending": None if self.pending is None else self.pending.detach().cpu()}

    def load_state_dict(self, data: dict[str, Any], device: torch.device) -> None:
        for store, keys, values in zip(self.rows, data["keys"], data["values"], strict=True):
            store.add(keys, values)
        self.pending = None if data["pending"] is None else data["pending"].to(device)


class OutputReader:
    """Turns a segment's logits into the log-probabilities of kNN-LM's mixture or TRIME's joint softmax."""

    def __init__(self, config: UniMemConfig, decoder: nn.Module) -> None:
        self.reading = config.reading
        self.train_memory = config.training.strategy == "trime"
        self.tap = FfnInputTap(decoder)
        self.external: Datastore | None = None

    def mode(self, grad: bool) -> str:
        """`knn`, `trime` or `none`: a trime-trained model reads its local memory while training."""
        if self.reading.output == "none" and grad and self.train_memory:
            return "trime"
        return self.reading.output

    def new_state(self, batch: int, dim: int) -> OutputState:
        metric = "l2" if self.reading.output == "knn" else "ip"
        return OutputState([Datastore(self.reading, metric, dim) for _ in range(batch)], self.external)

    def close(self) -> None:
        self.tap.remove()

    def read(self, state: OutputState, logits: torch.Tensor, keys: torch.Tensor, ids: torch.Tensor, *,
             n_new: int, write: bool, grad: bool) -> torch.Tensor:
        """Log-probabilities [batch, n_new, vocab] for the last `n_new` positions of the open segment.

        logits [batch, n_new, vocab] at those positions; keys [batch, P, dim] and ids [batch, P] of the segment's
        positions so far (the new ones last). With `write`, the segment's entries join each row's datastore.
        """
        mode = self.mode(grad)
        state.admit_pending(ids[:, 0])
        queries = keys[:, keys.shape[1] - n_new:]  # [batch, n_new, dim]
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if mode == "knn":
            out = self._knn(state, wide, queries)
        elif mode == "trime":
            out = self._trime(state, wide, queries, keys, ids, n_new, grad and self.train_memory)
        else:
            out = logits
        if write:
            for row, store in enumerate(state.rows):
                store.add(keys[row, :-1], ids[row, 1:])
            state.pending = keys[:, -1].detach()
        return out

    def _retrieve(self, state: OutputState, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, the top-k of the document's and the external datastore together: (scores, tokens), each
        [batch, n, k'] on the queries' device, -inf (token 0) where a row found fewer."""
        k = self.reading.output_topk
        found = []
        for row, store in enumerate(state.rows):
            parts = [s.search(queries[row], k) for s in (store, state.external) if s is not None and len(s)]
            if not parts:
                found.append((torch.zeros(queries.shape[1], 0), torch.zeros(queries.shape[1], 0, dtype=torch.long)))
                continue
            scores, tokens = torch.cat([p[0] for p in parts], -1), torch.cat([p[1] for p in parts], -1)
            top, pick = scores.topk(min(k, scores.shape[-1]), dim=-1)
            found.append((top, tokens.gather(-1, pick)))
        width = max(f[0].shape[-1] for f in found)
        scores = torch.full((len(found), queries.shape[1], width), float("-inf"))
        tokens = torch.zeros(len(found), queries.shape[1], width, dtype=torch.long)
        for row, (s, t) in enumerate(found):
            scores[row, :, :s.shape[-1]], tokens[row, :, :t.shape[-1]] = s, t
        return scores.to(queries.device), tokens.to(queries.device)

    def _knn(self, state: OutputState, logits: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        neg_dist, tokens = self._retrieve(state, queries)
        return knn_mixture(logits, neg_dist, tokens, self.reading.output_lambda, self.reading.output_temperature)

    def _trime(self, state: OutputState, logits: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor,
               ids: torch.Tensor, n_new: int, grad_memory: bool) -> torch.Tensor:
        r = self.reading
        scale = 1.0 / (math.sqrt(keys.shape[-1]) * r.output_temperature)
        q = queries.to(logits.dtype)
        local_keys = keys.to(logits.dtype) if grad_memory else keys.detach().to(logits.dtype)
        local = (q @ local_keys.transpose(-1, -2)) * scale  # [batch, n_new, P]
        total = keys.shape[1]
        rows = torch.arange(total - n_new, total, device=q.device)[:, None]
        cols = torch.arange(total, device=q.device)[None, :]
        local = local.masked_fill(cols >= rows, float("-inf"))  # entry j (token ids[j + 1]) only for j < i
        local_tokens = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)  # the last column is always masked
        local_tokens = local_tokens[:, None, :].expand(-1, n_new, -1)
        if r.output == "trime":  # long and external memory; the training loss alone reads the segment
            scores, tokens = self._retrieve(state, queries)
            local = torch.cat([local, scores.to(local.dtype) * scale], -1)  # [batch, n_new, M]
            local_tokens = torch.cat([local_tokens, tokens], -1)
        return joint_softmax(logits, local, local_tokens)


def joint_softmax(logits: torch.Tensor, scores: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """TRIME's one softmax over the vocabulary and the memory: logits [batch, n, vocab], memory scores and tokens
    [batch, n, M] (-inf: not read) -> log p [batch, n, vocab], p(w) = (exp(logit_w) + sum over entries j of token w
    of exp(score_j)) / Z, Z the sum over the vocabulary and every entry."""
    top = scores.amax(-1, keepdim=True).clamp_min(-1e30).detach()  # finite shift, -1e30 when nothing is read
    if logits.requires_grad or scores.requires_grad:  # autograd takes no out= argument
        log_z = torch.logsumexp(torch.cat([logits, scores], -1), dim=-1, keepdim=True)
        mass = torch.zeros_like(logits).scatter_add(-1, tokens, torch.exp(scores - top))
        return torch.logaddexp(logits, _log_mass(mass, top)) - log_z
    # Off the memory's tokens log p is logit - log Z: one log_softmax and one subtraction over the vocabulary; the
    # memory's tokens are summed and mixed in log p's own buffer, as in `knn_mixture` (the path above: 129 ms of a
    # 256-token segment at a 32K vocabulary).
    out = torch.log_softmax(logits, dim=-1)  # [batch, n, vocab]: logit - log Z_vocab
    # log Z_vocab = max - log_softmax's value at the max (that value is exactly -log sum exp(logit - max)).
    log_z_vocab = logits.amax(-1, keepdim=True) - out.amax(-1, keepdim=True)  # [batch, n, 1]
    log_z = torch.logaddexp(log_z_vocab, torch.logsumexp(scores, dim=-1, keepdim=True))
    voted_logits = logits.gather(-1, tokens)  # [batch, n, M]
    log_mem = _log_mass(_sum_per_token(out, tokens, torch.exp(scores - top)), top)  # [batch, n, M]
    out.sub_(log_z - log_z_vocab)
    return out.scatter_(-1, tokens, torch.logaddexp(voted_logits, log_mem) - log_z)  # a token's entries agree


def knn_mixture(logits: torch.Tensor, neg_dist: torch.Tensor, tokens: torch.Tensor, lam: float,
                temperature: float) -> torch.Tensor:
    """kNN-LM's log p = log(lam p_kNN + (1 - lam) p_LM): logits [batch, n, vocab], the neighbours' -distances and
    tokens [batch, n, k] (-inf, any token, for padding) -> [batch, n, vocab]; a query with no neighbour keeps
    log p_LM.

    p_kNN is 0 off the k neighbours' tokens, where log p is log p_LM + log(1 - lam): only those k tokens need the
    log-sum-exp. (Over the whole vocabulary, the scatter, log and logaddexp took 99 ms of a 256-token segment at a
    32K vocabulary; this takes 15 ms, of which the log_softmax is 10-13.)"""
    if neg_dist.shape[-1] == 0:
        return torch.log_softmax(logits, dim=-1)
    logits_knn = neg_dist.to(logits.dtype)
    if temperature != 1.0:  # x / 1 is x: the division is skipped, not changed
        logits_knn = logits_knn / temperature
    weights = torch.softmax(logits_knn, dim=-1).nan_to_num_(0.0)  # [batch, n, k]; 0 for padding
    has = torch.isfinite(neg_dist).any(-1, keepdim=True)  # [batch, n, 1]
    lm_weight = torch.where(has, _log(1 - lam), 0.0).to(logits.dtype)  # [batch, n, 1]: no neighbour keeps p_LM
    knn_weight = _log(lam)
    # p_kNN of each neighbour's token [batch, n, k]: its votes summed in neighbour order by a scatter (a [k x k]
    # same-token product costs 4-10 ms a segment); log 0 = -inf where no neighbour votes. p_kNN carries no
    # gradient: the search reads detached keys.
    if logits.requires_grad:  # autograd takes no out= argument
        log_lm = torch.log_softmax(logits, dim=-1)
        p_knn = _sum_per_token(torch.empty_like(log_lm), tokens, weights)  # a scratch buffer: no gradient
        voted = torch.logaddexp(p_knn.log() + knn_weight, log_lm.gather(-1, tokens) + lm_weight)  # [batch, n, k]
        # A token voted twice gets the same value twice, and the scatter's backward would hand each vote the whole
        # gradient: only a token's first vote passes it.
        same = tokens.unsqueeze(-1) == tokens.unsqueeze(-2)  # [batch, n, k, k]
        voted = torch.where(same.tril(-1).any(-1), voted.detach(), voted)
        return (log_lm + lm_weight).scatter(-1, tokens, voted)
    # In log p_LM's own buffer: read log p_LM at the votes, sum p_kNN there, and overwrite them with the mixture.
    out = torch.log_softmax(logits, dim=-1)
    lm_voted = out.gather(-1, tokens) + lm_weight  # [batch, n, k]
    voted = torch.logaddexp(_sum_per_token(out, tokens, weights).log() + knn_weight, lm_voted)
    if bool((lm_weight != 0).any()):  # x + 0 is x: the pass over the vocabulary is skipped, not changed
        out.add_(lm_weight)
    return out.scatter_(-1, tokens, voted)  # a token voted twice gets the same value twice


def _sum_per_token(buffer: torch.Tensor, tokens: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """At each entry of tokens [batch, n, m], the sum of values [batch, n, m] over the entries of its token, summed
    in entry order in buffer [batch, n, vocab] itself (overwritten at those tokens; the caller's own log p buffer,
    since a fresh [batch, n, vocab] one costs its page faults: 25 ms at a 32K vocabulary)."""
    return buffer.scatter_(-1, tokens, 0.0).scatter_add_(-1, tokens, values).gather(-1, tokens)


def _log_mass(mass: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """log(mass) + top, -inf where mass is 0 (memory entries summed after a shift by their maximum `top`)."""
    return torch.where(mass > 0, mass.clamp_min(torch.finfo(mass.dtype).tiny).log() + top, float("-inf"))


def _log(x: float) -> float:
    return math.log(x) if x > 0 else float("-inf")


def corpus_datastore(reader: OutputReader, lm: Any, docs: Sequence[torch.Tensor], cache: Path) -> Datastore:
    """The external datastore of a tokenized corpus: every (key, next token) of each document read in the run's
    segments without memory, loaded from `cache` when the same model (its config and output weights), tokens and
    settings were indexed before."""
    r = reader.reading
    digest = hashlib.sha256(lm.model.config.to_json_string().encode())
    head = lm.model.get_output_embeddings().get_parameter("weight")
    digest.update(head.detach().float().cpu().numpy().tobytes())
    digest.update(f"{r.output}|{r.index}|{r.ivf_lists}|{r.hnsw_neighbors}|{lm.segment_len}".encode())
    for doc in docs:
        digest.update(np.asarray(doc, dtype=np.int64).tobytes())
    path = cache / f"datastore-{digest.hexdigest()[:24]}.pt"
    dim = lm.model.config.hidden_size
    store = Datastore(r, "l2" if r.output == "knn" else "ip", dim)
    index_path = path.with_suffix(".faiss")
    if path.exists():  # written after the index beside it
        saved = torch.load(path, weights_only=True)
        store._keys, store._values, store.size = saved["keys"], saved["values"], len(saved["values"])
        if index_path.exists():
            import faiss

            store.index = faiss.read_index(str(index_path))
            if _is_ivf(store.index):
                store.index.nprobe = r.ivf_probe
        return store
    keys, values = [], []
    with torch.inference_mode():
        for doc in docs:
            for start in range(0, len(doc) - 1, lm.segment_len):
                ids = doc[start:start + lm.segment_len + 1].to(lm.device)
                lm.model(input_ids=ids[None, :-1], use_cache=False)
                keys.append(reader.tap.take()[0].float().cpu())
                values.append(ids[1:].cpu())
    store.add(torch.cat(keys), torch.cat(values))  # at once: an IVF index trains on the whole corpus
    cache.mkdir(parents=True, exist_ok=True)
    if store.index is not None:
        import faiss

        faiss.write_index(store.index, str(index_path))
    # The keys file is written last and atomically: its presence means the index beside it is complete.
    torch.save({"keys": store.keys, "values": store.values}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return store
