"""Anchor-neighbourhood discovery (ANs) of Super-AND (docs/method.md, "Anchor neighbourhoods").

Entropies and similarities are computed in the dtype of the memory bank (float32 in training,
float64 in the tests that hold them against slow loops). The discovery can be split into parts
(``part = (index, parts)``) whose results a ``lib.collectives.Collectives`` joins.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .collectives import ONE_PROCESS


def _row_chunks(num_rows, itemsize=4, budget_bytes=128 * 2**20):
    """Rows per chunk so that two (chunk x N) blocks of ``itemsize``-byte numbers stay under ``budget_bytes``."""
    return max(1, min(num_rows, budget_bytes // (itemsize * max(num_rows, 1) * 2)))


BLOCK = 2048  # square (BLOCK x BLOCK) similarity blocks: 16 MiB each in float32, whatever N is


def block_pairs(num_rows, chunk_size, part=(0, 1)):
    """The (i, j >= i) square blocks of an (num_rows x num_rows) symmetric matrix, as (row start, column
    start), in order, that part ``part = (index, parts)`` takes: every ``parts``-th pair from its
    ``index``-th, so the parts' shares differ by at most one block pair and together are every pair once."""
    index, parts = part
    starts = range(0, num_rows, chunk_size)
    pairs = [(i, j) for i in starts for j in starts if j >= i]
    return pairs[index::parts]


def part_rows(num_rows, part=(0, 1)):
    """The contiguous rows [start, stop) of part ``part = (index, parts)`` when ``num_rows`` rows are split
    into ``parts`` shares that differ by at most one row, in order."""
    index, parts = part
    return num_rows * index // parts, num_rows * (index + 1) // parts


@torch.no_grad()
def entropy_sums(memory, temperature, chunk_size=None, part=(0, 1)):
    """This part's share of the per-row sums (Z_i, Σ_j e_ij z_ij) that ``sample_entropy`` forms its entropies
    from; the sums over all parts ``(0, P) ... (P - 1, P)`` are the sums of one part ``(0, 1)`` up to the
    order of the additions (``entropy_from_sums`` of them is the entropy).

    Unit-scale rows: the (i, j >= i) block pairs of ``block_pairs`` (round-robin over the pairs in order),
    each adding to its rows and, off the diagonal, to its columns. Larger rows (each row shifted by its
    maximum): the part's row chunks, round-robin, each row's sums whole in one part and zero in the others.
    """
    num_rows = memory.shape[0]
    index, parts = part
    scaled = memory / temperature
    total = torch.zeros(num_rows, dtype=memory.dtype, device=memory.device)  # Z_i
    weighted = torch.zeros(num_rows, dtype=memory.dtype, device=memory.device)  # Σ_j e_ij z_ij
    if memory.norm(dim=1).max() ** 2 / temperature > 60:  # exp could overflow float32: shift each row
        chunk_size = chunk_size or _row_chunks(num_rows, memory.element_size())
        for start in list(range(0, num_rows, chunk_size))[index::parts]:
            logits = scaled[start:start + chunk_size] @ memory.T  # (chunk, N) rows of z
            logits -= logits.amax(dim=1, keepdim=True)  # the entropy of a row is invariant to a shift
            exps = torch.exp(logits)
            total[start:start + chunk_size] = exps.sum(1)
            weighted[start:start + chunk_size] = (exps * logits).sum(1)
        return total, weighted
    chunk_size = chunk_size or BLOCK
    for i, j in block_pairs(num_rows, chunk_size, part):
        logits = scaled[i:i + chunk_size] @ memory[j:j + chunk_size].T  # block (i, j) of z; (j, i) is its transpose
        exps = torch.exp(logits)
        products = exps * logits
        total[i:i + chunk_size] += exps.sum(1)
        weighted[i:i + chunk_size] += products.sum(1)
        if j != i:
            total[j:j + chunk_size] += exps.sum(0)
            weighted[j:j + chunk_size] += products.sum(0)
    return total, weighted


def entropy_from_sums(total, weighted):
    """H_i = log Z_i − Σ_j e_ij z_ij / Z_i from the sums of ``entropy_sums`` (added over the parts)."""
    return total.log() - weighted / total


@torch.no_grad()
def sample_entropy(memory, temperature, chunk_size=None):
    """Entropy of softmax(memory · memoryᵀ / τ) for every row (own column included), in blocks.

    With e = exp(z), Z_i = Σ_j e_ij: H_i = log Z_i − Σ_j e_ij z_ij / Z_i. z is symmetric, so each
    off-diagonal (chunk x chunk) block is computed once and serves its rows and its columns: half
    the O(N²·d) products and half the exponentials, with two blocks of memory at a time. That needs
    exp(z) to stay finite unshifted, which holds for a trained bank (unit rows: |z| <= 1 / τ); for
    rows with larger norms the row maximum is subtracted, one block row at a time.
    """
    return entropy_from_sums(*entropy_sums(memory, temperature, chunk_size))


@torch.no_grad()
def nearest_neighbours(memory, queries, num_neighbours, chunk_size=None):
    """The ``num_neighbours`` nearest rows of ``memory`` to each row index in ``queries`` by cosine
    similarity, itself excluded.

    Square (chunk x chunk) blocks of similarities, each one's top k merged into a running top k,
    so only two small blocks are in memory at a time.
    """
    num_rows = memory.shape[0]
    chunk_size = chunk_size or BLOCK
    unit = F.normalize(memory, dim=1)
    out = torch.empty(len(queries), num_neighbours, dtype=torch.long, device=memory.device)
    for start in range(0, len(queries), chunk_size):
        rows = queries[start:start + chunk_size]
        query = unit[rows]
        best_sim = torch.full((len(rows), 0), float("-inf"), dtype=unit.dtype, device=memory.device)
        best_idx = torch.empty((len(rows), 0), dtype=torch.long, device=memory.device)
        for j in range(0, num_rows, chunk_size):
            sim = query @ unit[j:j + chunk_size].T  # (chunk, block)
            own = (rows >= j) & (rows < j + sim.shape[1])
            sim[own.nonzero().squeeze(1), rows[own] - j] = float("-inf")  # not itself
            top = sim.topk(min(num_neighbours, sim.shape[1]), dim=1)
            best_sim = torch.cat([best_sim, top.values], dim=1)
            best_idx = torch.cat([best_idx, top.indices + j], dim=1)
            if best_sim.shape[1] > num_neighbours:
                keep = best_sim.topk(num_neighbours, dim=1).indices
                best_sim, best_idx = best_sim.gather(1, keep), best_idx.gather(1, keep)
        out[start:start + chunk_size] = best_idx
    return out


@torch.no_grad()
def discover_neighbourhoods(memory, temperature, num_anchors, neighbourhood_size, chunk_size=None,
                            return_entropy=False, collectives=ONE_PROCESS):
    """Pick the ``num_anchors`` lowest-entropy samples as anchors and find their neighbourhoods.

    The work is split over ``collectives.part``: each part adds its share of the entropy's sums
    (``entropy_sums``), the sums of all parts give every part the same entropies and anchors, and each
    part finds the neighbours of its contiguous share of the anchors (``part_rows``), joined in order.
    All parts use the first part's ``memory`` (``collectives.broadcast``). Split, the entropies differ
    from one part's by the order of the additions only.

    Args:
        memory: (N, d) memory bank.
        temperature: τ (npc_t) of the entropy's softmax.
        num_anchors: floor(N · ANs_select_rate · round).
        neighbourhood_size: k, neighbours per anchor (ANs_size).
        chunk_size: rows (and columns) per similarity block; BLOCK by default.
        collectives: a ``lib.collectives.Collectives``; ``ONE_PROCESS`` (the whole work here) by default.
    Returns (anchor_indexes (num_anchors,), neighbours (num_anchors, neighbourhood_size)), and the (N,)
    entropies as a third element when ``return_entropy``.
    """
    part = collectives.part
    memory = collectives.broadcast(memory)
    sums = collectives.all_reduce_sum(torch.stack(entropy_sums(memory, temperature, chunk_size, part)))
    entropy = entropy_from_sums(sums[0], sums[1])
    anchors = entropy.topk(num_anchors, largest=False).indices
    start, stop = part_rows(num_anchors, part)
    neighbours = collectives.gather_rows(
        nearest_neighbours(memory, anchors[start:stop], neighbourhood_size, chunk_size))
    return (anchors, neighbours, entropy) if return_entropy else (anchors, neighbours)


class AnchorNeighbourhoods(nn.Module):
    """The anchors and their neighbours of the current round, as buffers named as in the released files.

    Buffers: samples_num, anchor_indexes, instance_indexes (the non-anchors), position (an anchor's
    row in ``neighbours``, or −1 − its row in ``instance_indexes``), neighbours (num_anchors, k),
    entropy (N,), consistency (share of neighbours with the anchor's ground-truth label, over the pairs
    whose labels are known; printed only).
    ``discover`` keeps ``entropy`` in the dtype of the memory it is given.
    """

    def __init__(self, num_samples, neighbourhood_size=1):
        super().__init__()
        self.neighbourhood_size = neighbourhood_size
        self.register_buffer("samples_num", torch.tensor(num_samples))
        self.register_buffer("anchor_indexes", torch.zeros(0, dtype=torch.long))
        self.register_buffer("instance_indexes", torch.arange(num_samples))
        self.register_buffer("position", -1 - torch.arange(num_samples))
        self.register_buffer("neighbours", torch.zeros(0, neighbourhood_size, dtype=torch.long))
        self.register_buffer("entropy", torch.zeros(num_samples))
        self.register_buffer("consistency", torch.tensor(0.0))

    @torch.no_grad()
    def discover(self, memory, temperature, num_anchors, labels=None, collectives=ONE_PROCESS):
        """Find this round's anchors and neighbourhoods in ``memory`` (``discover_neighbourhoods``, the work
        split over ``collectives.part``) and keep them; returns the consistency, from ``labels``."""
        anchors, neighbours, entropy = discover_neighbourhoods(
            memory, temperature, num_anchors, self.neighbourhood_size, return_entropy=True,
            collectives=collectives)
        num_samples = int(self.samples_num)
        is_anchor = torch.zeros(num_samples, dtype=torch.bool, device=entropy.device)
        is_anchor[anchors] = True
        instances = (~is_anchor).nonzero().squeeze(1)
        position = torch.empty(num_samples, dtype=torch.long, device=entropy.device)
        position[anchors] = torch.arange(len(anchors), device=entropy.device)
        position[instances] = -1 - torch.arange(len(instances), device=entropy.device)
        if self.entropy.dtype != entropy.dtype:  # load_state_dict would cast into the old dtype
            self.entropy = self.entropy.to(entropy.dtype)
        consistency = torch.tensor(0.0)
        if labels is not None and len(anchors):
            labels = labels.to(entropy.device)
            pairs = labels[neighbours], labels[anchors].unsqueeze(1).expand_as(neighbours)
            known = (pairs[0] >= 0) & (pairs[1] >= 0)  # unlabelled images (label -1) are left out
            if known.any():
                consistency = (pairs[0] == pairs[1])[known].float().mean()
        self.load_state_dict({
            "samples_num": self.samples_num, "anchor_indexes": anchors, "instance_indexes": instances,
            "position": position, "neighbours": neighbours, "entropy": entropy,
            "consistency": consistency})
        return float(consistency)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the number of anchors changes every round: take the saved shapes rather than ours
        for name, buffer in self._buffers.items():
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != buffer.shape:
                self._buffers[name] = torch.empty_like(saved, device=buffer.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def lookup(self, indexes):
        """(neighbours (B, k), is_anchor (B,)) for a batch of dataset indexes."""
        position = self.position[indexes]
        is_anchor = position >= 0
        if len(self.neighbours) == 0:
            return torch.zeros(len(indexes), self.neighbourhood_size, dtype=torch.long,
                               device=indexes.device), is_anchor
        return self.neighbours[position.clamp(min=0)], is_anchor
