"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018).

A stack of causal self-attention blocks reads a user's item sequence (learned item and
positional embeddings, dropout, layer norm, pre-norm residual blocks with a point-wise
feed-forward network); the hidden state at each position predicts the next item by a
dot product with the *same* item embedding table (shared input/output embeddings).

Loss: **full softmax cross-entropy** over the whole item vocabulary at every position
(or, with `negatives`, a sampled softmax against that many items drawn per batch, for
catalogues where the full softmax is most of the cost: drawn uniformly, or in proportion
to each item's frequency in the fit data with every logit corrected by the log of its
probability of being drawn, so that the sampled loss estimates the full softmax's
(Bengio & Senecal 2008; Yi et al., "Sampling-bias-corrected neural modeling", RecSys 2019)),
not the paper's binary cross-entropy with one sampled negative. With catalogues of a few
thousand items (ML-100K has 1,682) the full softmax costs little on a CPU, and it is known
to converge in far fewer epochs and to rank better than one-negative BCE (Klenitskiy &
Vasilev, "Turning Dross Into Gold Loss: is BERT4Rec really better than SASRec?", RecSys
2023), which matters for a baseline that must train in a couple of minutes on two cores.

Training data: every user's fit sequence is cut, from its end, into windows of
`max_len + 1` items (the last window may be shorter and is left-padded), so long
histories are used in full rather than only their last `max_len` items. Sequences are
left-padded and right-aligned, so the newest item always sits at position `max_len - 1`
both in training and in scoring. Batches group windows of similar length and drop the
columns that are padding in every row, which changes nothing the network computes at
the kept positions; on a log of short sequences (Amazon Games: 8.7 items per user) it
saves most of the work.

Scoring a task encodes the last `max_len` known items of `task.history` (items unknown to
the vocabulary are skipped) and scores each candidate by the dot product of the final
hidden state with the candidate's embedding. Candidates unknown to the vocabulary score
`UNKNOWN_SCORE` (very low but finite, so a ranking stays stable); an empty history (or one
with no known item) scores every candidate 0. Items that appear only in `FitData.items`
get an embedding that is never trained.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from starrec.core import FitData, Recommender, Task
from starrec.data.splits import sorted_ids
from starrec.latent.state import ModelState
from starrec.paths import available_cores
from starrec.progress import progress as progress_bar

log = logging.getLogger(__name__)

UNKNOWN_SCORE = -1e9
PAD = 0
# what the network is built with: kept with a fitted model's weights (`SASRec.state`)
NETWORK_PARAMS = ("max_len", "hidden", "blocks", "heads", "dropout")
NEGATIVE_SAMPLING = ("uniform", "popularity")


def sampled_softmax_loss(states: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         drawn: torch.Tensor, log_q: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of each row's target (ids into `weight`) against the `drawn` ids: a
    drawn id equal to the row's own target does not count; with `log_q` (log-probability
    of drawing id i at index i - 1) every logit, the target's too, is lowered by it, the
    sampled softmax's correction for a non-uniform draw."""
    positive = (states * weight[targets]).sum(dim=-1, keepdim=True)
    negative = states @ weight[drawn].T
    if log_q is not None:
        positive = positive - log_q[targets - 1][:, None]
        negative = negative - log_q[drawn - 1][None, :]
    negative = negative.masked_fill(drawn[None, :] == targets[:, None], float("-inf"))
    logits = torch.cat([positive, negative], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(targets), dtype=torch.long,
                                               device=states.device))


class _Block(nn.Module):
    """Pre-norm transformer block: causal multi-head self-attention, then a feed-forward net."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        shape = (batch, length, self.heads, hidden // self.heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        attended = attended.transpose(1, 2).reshape(batch, length, hidden)
        x = x + self.drop(self.out(attended))
        return x + self.drop(self.ffn(self.norm2(x)))


def trim(seq: torch.Tensor) -> torch.Tensor:
    """`seq` (left-padded rows) without the leading columns that are padding in every row:
    the network's output at the kept positions is the same, at a fraction of the cost
    when most sequences are short."""
    filled = (seq != PAD).any(dim=0).nonzero()
    start = int(filled[0]) if len(filled) else seq.shape[1] - 1
    return seq[:, start:]


def length_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                   pool: int = 50) -> list[np.ndarray]:
    """Row indices in batches of `batch_size`: shuffled, then sorted by length within
    pools of `pool` batches so that a batch holds rows of similar length (and `trim`
    cuts most of its padding), the batches in random order."""
    order = rng.permutation(len(lengths))
    batches: list[np.ndarray] = []
    for start in range(0, len(order), batch_size * pool):
        chunk = order[start:start + batch_size * pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


class _SASRecNet(nn.Module):
    def __init__(self, n_tokens: int, max_len: int, hidden: int, blocks: int, heads: int,
                 dropout: float) -> None:
        super().__init__()
        self.hidden = hidden
        self.item = nn.Embedding(n_tokens, hidden, padding_idx=PAD)
        self.position = nn.Embedding(max_len, hidden)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(hidden, heads, dropout) for _ in range(blocks))
        self.norm = nn.LayerNorm(hidden)
        nn.init.normal_(self.item.weight, std=hidden**-0.5)
        nn.init.normal_(self.position.weight, std=hidden**-0.5)
        with torch.no_grad():
            self.item.weight[PAD].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """(batch, length) token ids, left-padded -> (batch, length, hidden) states."""
        length = seq.shape[1]
        keep = (seq != PAD).unsqueeze(-1)
        # right-aligned: a batch cut to its longest row (`trim`) keeps every item's position
        width = self.position.num_embeddings
        positions = torch.arange(width - length, width, device=seq.device)
        x = self.item(seq) * math.sqrt(self.hidden) + self.position(positions)
        x = self.drop(x) * keep
        # Query i may attend to key j <= i that is not padding; always to itself, so a
        # padded row is never fully masked (its output is ignored anyway).
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
        mask = causal & (seq != PAD)[:, None, :]
        mask = (mask | torch.eye(length, dtype=torch.bool, device=seq.device)).unsqueeze(1)
        for block in self.blocks:
            x = block(x, mask) * keep
        return self.norm(x)


class SASRec(Recommender):
    """Self-attentive sequential recommender trained with full softmax cross-entropy."""

    name = "sasrec"

    def __init__(
        self,
        max_len: int = 50,
        hidden: int = 64,
        blocks: int = 2,
        heads: int = 2,
        dropout: float = 0.2,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        batch_size: int = 128,
        epochs: int = 60,
        seed: int = 0,
        device: str = "cpu",
        threads: int | None = None,
        progress: bool = True,
        negatives: int | None = None,
        negative_sampling: str = "uniform",
    ) -> None:
        if max_len < 1 or hidden < 1 or blocks < 0 or heads < 1 or epochs < 0 or batch_size < 1:
            raise ValueError("SASRec: max_len, hidden, heads, batch_size must be >= 1; "
                             "blocks, epochs >= 0")
        if negatives is not None and negatives < 1:
            raise ValueError("SASRec: negatives must be >= 1 (None: full softmax)")
        if negative_sampling not in NEGATIVE_SAMPLING:
            raise ValueError(f"SASRec: negative_sampling {negative_sampling!r}: one of "
                             f"{list(NEGATIVE_SAMPLING)}")
        if negative_sampling != "uniform" and negatives is None:
            raise ValueError("SASRec: negative_sampling needs negatives (the full softmax "
                             "draws none)")
        self.negatives = negatives
        self.negative_sampling = negative_sampling
        self._log_q: torch.Tensor | None = None  # log-probability of drawing each id (1..n)
        self.max_len = max_len
        self.hidden = hidden
        self.blocks = blocks
        self.heads = heads
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.epochs = epochs
        self.seed = seed
        self.device = torch.device(device)
        self.threads = threads
        self.progress = progress
        self.net: _SASRecNet | None = None
        self.vocab: dict[str, int] = {}
        self.fit_seconds: float | None = None
        self.losses: list[float] = []

    # -- data -----------------------------------------------------------------------------

    def _windows(self, sequences: Sequence[list[int]]) -> np.ndarray:
        """Cut each sequence, from its end, into left-padded windows of max_len + 1 ids."""
        width = self.max_len + 1
        rows: list[np.ndarray] = []
        for sequence in sequences:
            if len(sequence) < 2:  # a window needs one input and one target
                continue
            end = len(sequence)
            while True:
                start = max(0, end - width)
                row = np.full(width, PAD, dtype=np.int64)
                row[width - (end - start):] = sequence[start:end]
                rows.append(row)
                if start == 0:
                    break
                end = start + 1  # windows overlap by one item: every transition is a target once
        if not rows:
            return np.zeros((0, width), dtype=np.int64)
        return np.stack(rows)

    def _encode_history(self, history: Sequence[str]) -> np.ndarray:
        ids = [self.vocab[item] for item in history if item in self.vocab][-self.max_len:]
        row = np.full(self.max_len, PAD, dtype=np.int64)
        if ids:
            row[self.max_len - len(ids):] = ids
        return row

    # -- Recommender ----------------------------------------------------------------------

    def fit(self, data: FitData,
            on_epoch: Callable[[int, SASRec], None] | None = None) -> SASRec:
        """`on_epoch(epoch, self)` runs after every epoch with the network in eval mode, so a
        caller can score validation tasks while training (how `epochs` is chosen)."""
        started = time.perf_counter()
        frame = data.interactions
        items = sorted_ids(list(frame["item"].astype(str)) + [str(i) for i in data.items.index])
        self.vocab = {item: index for index, item in enumerate(items, start=1)}
        codes = frame["item"].astype(str).map(self.vocab).to_numpy(dtype=np.int64)
        users = frame["user"].astype(str).to_numpy()
        sequences = [codes[idx] for idx in _group_indices(users)]
        windows = self._windows(sequences)
        self._log_q = self._draw_log_probabilities(codes, len(self.vocab))

        limit = available_cores()
        if self.threads is not None:
            torch.set_num_threads(max(1, min(self.threads, limit)))
        elif torch.get_num_threads() > limit:
            torch.set_num_threads(limit)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            rng = np.random.default_rng(self.seed)
            net = _SASRecNet(len(self.vocab) + 1, self.max_len, self.hidden, self.blocks,
                             self.heads, self.dropout).to(self.device)
            optimizer = torch.optim.Adam(net.parameters(), lr=self.lr,
                                         weight_decay=self.weight_decay)
            data_tensor = torch.from_numpy(windows)
            lengths = (windows != PAD).sum(axis=1)
            n_batches = math.ceil(len(windows) / self.batch_size) if len(windows) else 0
            self.losses = []
            net.train()
            bar = progress_bar(range(self.epochs), "sasrec", unit="epoch",
                               enabled=self.progress and n_batches > 0)
            for _ in bar:
                if n_batches == 0:
                    break
                total = 0.0
                for rows in length_batches(lengths, self.batch_size, rng):
                    batch = trim(data_tensor[torch.from_numpy(rows)]).to(self.device)
                    inputs, targets = batch[:, :-1], batch[:, 1:]
                    valid = (inputs != PAD) & (targets != PAD)
                    loss = self._loss(net, net(inputs)[valid], targets[valid])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += loss.item()
                self.losses.append(total / n_batches)
                bar.set_postfix(loss=f"{self.losses[-1]:.3f}", refresh=False)
                if on_epoch is not None:
                    self.net = net.eval()
                    on_epoch(len(self.losses), self)
                    net.train()
            net.eval()
        self.net = net
        self.fit_seconds = time.perf_counter() - started
        log.info("sasrec: %d items, %d windows, %d epochs in %.1f s", len(self.vocab),
                 len(windows), self.epochs, self.fit_seconds)
        return self

    def _full_softmax(self, n_items: int) -> bool:
        """Whether the loss runs over the whole catalogue (no negatives, or as many as items)."""
        return self.negatives is None or self.negatives >= n_items

    def _draw_log_probabilities(self, codes: np.ndarray, n_items: int) -> torch.Tensor | None:
        """log q(id) for ids 1..n_items under `negative_sampling` (None when the loss is the
        full softmax or the draw is uniform, whose correction is a constant)."""
        if self._full_softmax(n_items) or self.negative_sampling == "uniform":
            return None
        counts = np.bincount(codes, minlength=n_items + 1)[1:].astype(np.float64)
        counts += 1.0  # an item seen only in the catalogue can still be drawn
        return torch.from_numpy(np.log(counts / counts.sum())).float().to(self.device)

    def _loss(self, net: _SASRecNet, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each position's next item (token ids `targets`): over the whole
        catalogue, or with `negatives` against that many items drawn for the batch."""
        weight = net.item.weight
        n_items = weight.shape[0] - 1
        if self._full_softmax(n_items):
            logits = states @ weight[1:].T  # the pad token is never a class
            return F.cross_entropy(logits, targets - 1)
        if self._log_q is None:
            drawn = torch.randint(1, n_items + 1, (self.negatives,), device=states.device)
        else:
            drawn = torch.multinomial(self._log_q.exp(), self.negatives, replacement=True) + 1
        return sampled_softmax_loss(states, weight, targets, drawn, self._log_q)

    def state(self) -> ModelState:
        """The fitted network as plain data (`from_state` rebuilds it for scoring)."""
        if self.net is None:
            raise RuntimeError("sasrec: call fit() before state()")
        items = sorted(self.vocab, key=self.vocab.__getitem__)
        arrays = {name: tensor.detach().cpu().numpy()
                  for name, tensor in self.net.state_dict().items()}
        params = {name: getattr(self, name) for name in NETWORK_PARAMS}
        return ModelState("sasrec", params, items, arrays)

    @classmethod
    def from_state(cls, state: ModelState) -> SASRec:
        """A model that scores as the fitted one did; it is not trained further."""
        if state.kind != "sasrec":
            raise ValueError(f"not a SASRec state: {state.kind!r}")
        model = cls(**state.params, epochs=0, progress=False)
        model.vocab = {item: index for index, item in enumerate(state.items, start=1)}
        net = _SASRecNet(len(model.vocab) + 1, model.max_len, model.hidden, model.blocks,
                         model.heads, model.dropout)
        net.load_state_dict({name: torch.from_numpy(np.array(array))
                             for name, array in state.arrays.items()})
        model.net = net.eval()
        return model

    def score(self, task: Task) -> np.ndarray:
        return self.score_many([task])[0]

    def score_many(self, tasks: Sequence[Task], batch_size: int = 512) -> list[np.ndarray]:
        """Scores of many tasks, encoded in batches; same values as `score` on each."""
        if self.net is None:
            raise RuntimeError("sasrec: call fit() before scoring")
        results: list[np.ndarray] = []
        for start in range(0, len(tasks), batch_size):
            chunk = tasks[start:start + batch_size]
            seqs = trim(torch.from_numpy(np.stack([self._encode_history(t.history)
                                                   for t in chunk])))
            with torch.no_grad():
                final = self.net(seqs.to(self.device))[:, -1, :]
                weight = self.net.item.weight
                for row, task in enumerate(chunk):
                    if seqs[row, -1] == PAD:  # no known history item
                        results.append(np.zeros(len(task.candidates), dtype=np.float64))
                        continue
                    ids = [self.vocab.get(c, PAD) for c in task.candidates]
                    index = torch.tensor(ids, dtype=torch.long, device=weight.device)
                    values = (weight[index] @ final[row]).double().cpu().numpy()
                    values[index.cpu().numpy() == PAD] = UNKNOWN_SCORE
                    results.append(values)
        return results


def _group_indices(users: np.ndarray) -> list[np.ndarray]:
    """Row indices of each user, users in first-appearance order, rows in table order."""
    _, first, inverse = np.unique(users, return_index=True, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse))[:-1]
    groups = np.split(order, bounds)
    return [groups[g] for g in np.argsort(first, kind="stable")]
