"""Anchor-neighbourhood discovery (ANs) of Super-AND (REFERENCE §3)."""
import torch
import torch.nn.functional as F
from torch import nn


def _row_chunks(num_rows, dim, budget_bytes=256 * 2**20):
    """Rows per chunk so that one (chunk x N) float32 block stays under ``budget_bytes``."""
    return max(1, min(num_rows, budget_bytes // (4 * max(num_rows, 1) * 3)))


@torch.no_grad()
def sample_entropy(memory, temperature, chunk_size=None):
    """Entropy of softmax(memory · memoryᵀ / τ) for every row (own column included), in chunks."""
    n = memory.shape[0]
    chunk_size = chunk_size or _row_chunks(n, memory.shape[1])
    entropy = torch.empty(n, device=memory.device)
    for start in range(0, n, chunk_size):
        logits = memory[start:start + chunk_size] @ memory.T / temperature  # (chunk, N)
        log_p = F.log_softmax(logits, dim=1)
        entropy[start:start + chunk_size] = -(log_p.exp() * log_p).sum(1)
    return entropy


@torch.no_grad()
def nearest_neighbours(memory, queries, k, chunk_size=None):
    """The k nearest rows of ``memory`` to each row index in ``queries`` by cosine similarity, itself excluded."""
    n = memory.shape[0]
    chunk_size = chunk_size or _row_chunks(n, memory.shape[1])
    unit = F.normalize(memory, dim=1)
    out = torch.empty(len(queries), k, dtype=torch.long, device=memory.device)
    for start in range(0, len(queries), chunk_size):
        rows = queries[start:start + chunk_size]
        sim = unit[rows] @ unit.T  # (chunk, N)
        sim[torch.arange(len(rows), device=sim.device), rows] = float("-inf")  # not itself
        out[start:start + chunk_size] = sim.topk(k, dim=1).indices
    return out


@torch.no_grad()
def discover_neighbourhoods(memory, temperature, num_anchors, ans_size, chunk_size=None, return_entropy=False):
    """Pick the ``num_anchors`` lowest-entropy samples as anchors and find their neighbourhoods.

    Args:
        memory: (N, d) memory bank.
        temperature: τ (npc_t) of the entropy's softmax.
        num_anchors: floor(N · ANs_select_rate · round).
        ans_size: k, neighbours per anchor (ANs_size).
        chunk_size: rows per block; by default blocks of (chunk x N) stay at about 256 MiB.
    Returns (anchor_indexes (num_anchors,), neighbours (num_anchors, ans_size)), and the (N,)
    entropies as a third element when ``return_entropy``.
    """
    entropy = sample_entropy(memory, temperature, chunk_size)
    anchors = entropy.topk(num_anchors, largest=False).indices
    neighbours = nearest_neighbours(memory, anchors, ans_size, chunk_size)
    return (anchors, neighbours, entropy) if return_entropy else (anchors, neighbours)


class AnchorNeighbourhoods(nn.Module):
    """The anchors and their neighbours of the current round, as buffers named as in the released files.

    Buffers: samples_num, anchor_indexes, instance_indexes (the non-anchors), position (an anchor's
    row in ``neighbours``, or −1 − its row in ``instance_indexes``), neighbours (num_anchors, k),
    entropy (N,), consistency (share of neighbours with the anchor's ground-truth label; printed only).
    """

    def __init__(self, num_samples, ans_size=1):
        super().__init__()
        self.ans_size = ans_size
        self.register_buffer("samples_num", torch.tensor(num_samples))
        self.register_buffer("anchor_indexes", torch.zeros(0, dtype=torch.long))
        self.register_buffer("instance_indexes", torch.arange(num_samples))
        self.register_buffer("position", -1 - torch.arange(num_samples))
        self.register_buffer("neighbours", torch.zeros(0, ans_size, dtype=torch.long))
        self.register_buffer("entropy", torch.zeros(num_samples))
        self.register_buffer("consistency", torch.tensor(0.0))

    @torch.no_grad()
    def discover(self, memory, temperature, num_anchors, labels=None):
        n = int(self.samples_num)
        anchors, neighbours, entropy = discover_neighbourhoods(
            memory, temperature, num_anchors, self.ans_size, return_entropy=True)
        is_anchor = torch.zeros(n, dtype=torch.bool, device=memory.device)
        is_anchor[anchors] = True
        instances = (~is_anchor).nonzero().squeeze(1)
        position = torch.empty(n, dtype=torch.long, device=memory.device)
        position[anchors] = torch.arange(len(anchors), device=memory.device)
        position[instances] = -1 - torch.arange(len(instances), device=memory.device)
        consistency = torch.tensor(0.0)
        if labels is not None and len(anchors):
            labels = labels.to(memory.device)
            consistency = (labels[neighbours] == labels[anchors].unsqueeze(1)).float().mean()
        self.load_state_dict({
            "samples_num": self.samples_num, "anchor_indexes": anchors, "instance_indexes": instances,
            "position": position, "neighbours": neighbours, "entropy": entropy,
            "consistency": consistency})
        return float(consistency)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the number of anchors changes every round: take the saved shapes rather than ours
        for name, buf in self._buffers.items():
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != buf.shape:
                self._buffers[name] = torch.empty_like(saved, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def lookup(self, indexes):
        """(neighbours (B, k), is_anchor (B,)) for a batch of dataset indexes."""
        position = self.position[indexes]
        is_anchor = position >= 0
        if len(self.neighbours) == 0:
            return torch.zeros(len(indexes), self.ans_size, dtype=torch.long, device=indexes.device), is_anchor
        return self.neighbours[position.clamp(min=0)], is_anchor
