"""Anchor-neighbourhood discovery (docs/method.md, "Anchor neighbourhoods") against a slow loop, and
its saved state (docs/method.md, "Checkpoint formats")."""
import math
import threading

import pytest
import torch

from lib.collectives import ONE_PROCESS, Collectives
from lib.neighbourhoods import (
    AnchorNeighbourhoods,
    block_pairs,
    discover_neighbourhoods,
    entropy_from_sums,
    entropy_sums,
    nearest_neighbours,
    part_rows,
    sample_entropy,
)

TOLERANCE = {torch.float32: {"rtol": 1e-4, "atol": 1e-4}, torch.float64: {"rtol": 1e-12, "atol": 1e-12}}
BUFFERS = {"samples_num", "anchor_indexes", "instance_indexes", "position", "neighbours", "entropy",
           "consistency"}


def entropy_reference(memory, temperature):
    """Entropy of softmax(mem_i · memᵀ / τ) for every row, own column included."""
    mem = memory.double().tolist()
    out = []
    for row in mem:
        logits = [sum(a * b for a, b in zip(row, other)) / temperature for other in mem]
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        z = sum(exps)
        out.append(-sum((e / z) * math.log(e / z) for e in exps))
    return torch.tensor(out, dtype=torch.float64)


def neighbours_reference(memory, i, k):
    """The k rows most cosine-similar to row i, row i itself excluded (in descending similarity)."""
    mem = memory.double().tolist()
    norm = [math.sqrt(sum(v * v for v in row)) for row in mem]
    sims = [(sum(a * b for a, b in zip(mem[i], mem[j])) / (norm[i] * norm[j]), j)
            for j in range(len(mem)) if j != i]
    sims.sort(reverse=True)
    return [j for _, j in sims[:k]]


def _memory(seed, n=20, d=6, unit=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(n, d, generator=g, dtype=torch.float64)
    if unit:
        return torch.nn.functional.normalize(memory, dim=1).to(dtype)
    # norms from 0.2 to 3: dot product and cosine order neighbours differently
    norms = torch.rand(n, 1, generator=g, dtype=torch.float64).mul(2.8).add(0.2)
    return (memory / memory.norm(dim=1, keepdim=True) * norms).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("unit", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("chunk_size", [3, None])
def test_discover_neighbourhoods_matches_loop(seed, unit, chunk_size, dtype):
    memory = _memory(seed, unit=unit, dtype=dtype)
    temperature, num_anchors, k = 0.1 if unit else 0.5, 7, 3
    anchors, neighbours, entropy = discover_neighbourhoods(
        memory, temperature, num_anchors, k, chunk_size=chunk_size, return_entropy=True)
    ref_entropy = entropy_reference(memory, temperature)
    assert entropy.dtype == dtype
    torch.testing.assert_close(entropy.double(), ref_entropy, **TOLERANCE[dtype])
    order = ref_entropy.argsort().tolist()
    gap = ref_entropy[order[num_anchors]] - ref_entropy[order[num_anchors - 1]]
    assert gap > 1e-3  # precondition: the anchor set is well defined at float32 precision
    assert anchors.shape == (num_anchors,) and neighbours.shape == (num_anchors, k)
    assert sorted(anchors.tolist()) == sorted(order[:num_anchors])
    for row, a in enumerate(anchors.tolist()):
        assert neighbours[row].tolist() == neighbours_reference(memory, a, k)
        assert a not in neighbours[row].tolist()
    assert discover_neighbourhoods(memory, temperature, num_anchors, k, chunk_size=chunk_size)[0].tolist() \
        == anchors.tolist()
    # one part (the default collectives) is the plain entropy, topk and neighbour search to the last bit
    assert torch.equal(entropy, sample_entropy(memory, temperature, chunk_size))
    assert torch.equal(anchors, entropy.topk(num_anchors, largest=False).indices)
    assert torch.equal(neighbours, nearest_neighbours(memory, anchors, k, chunk_size))


def test_non_unit_rows_use_cosine_not_dot_product_for_neighbours():
    memory = _memory(2, unit=False)
    queries = torch.arange(20)
    found = nearest_neighbours(memory, queries, 2, chunk_size=3)
    by_dot = []
    for i in range(20):
        sims = [(float(memory[i] @ memory[j]), j) for j in range(20) if j != i]
        by_dot.append([j for _, j in sorted(sims, reverse=True)[:2]])
    assert found.tolist() != by_dot  # the test data separates the two definitions ...
    assert found.tolist() == [neighbours_reference(memory, i, 2) for i in range(20)]  # ... cosine wins


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_entropy_uses_raw_memory_and_temperature(dtype):
    memory = _memory(3, unit=False, dtype=dtype)
    # τ = 0.1: rows of norm up to 3 take the row-shifted path; τ = 1: the symmetric blocks
    for temperature in (0.1, 1.0):
        for chunk_size in (4, None):
            entropy = sample_entropy(memory, temperature, chunk_size=chunk_size)
            assert entropy.dtype == dtype
            torch.testing.assert_close(entropy.double(), entropy_reference(memory, temperature), **TOLERANCE[dtype])
    # uniform similarities give the entropy log N
    assert sample_entropy(torch.zeros(5, 3, dtype=dtype), 0.1).tolist() == pytest.approx([math.log(5)] * 5)


def test_float64_discovery_keeps_the_entropy_in_float64():
    memory = _memory(4, dtype=torch.float64)
    neighbourhoods = AnchorNeighbourhoods(20, neighbourhood_size=2)
    neighbourhoods.discover(memory, 0.1, 6)
    assert neighbourhoods.entropy.dtype == torch.float64
    torch.testing.assert_close(neighbourhoods.entropy, entropy_reference(memory, 0.1), **TOLERANCE[torch.float64])
    for row, a in enumerate(neighbourhoods.anchor_indexes.tolist()):
        assert neighbourhoods.neighbours[row].tolist() == neighbours_reference(memory, a, 2)
    assert set(neighbourhoods.state_dict()) == BUFFERS


def _discovered(seed=4, n=20, num_anchors=6, k=2, labels=True):
    memory = _memory(seed, n=n)
    neighbourhoods = AnchorNeighbourhoods(n, neighbourhood_size=k)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    consistency = neighbourhoods.discover(memory, 0.1, num_anchors, labels=y if labels else None)
    return neighbourhoods, memory, y, consistency


def test_round_zero_has_no_anchors():
    neighbourhoods = AnchorNeighbourhoods(10, neighbourhood_size=2)
    assert {name for name, _ in neighbourhoods.named_buffers()} == BUFFERS
    neighbours, is_anchor = neighbourhoods.lookup(torch.tensor([0, 3, 9]))
    assert not is_anchor.any()
    assert neighbours.shape == (3, 2)
    assert neighbourhoods.instance_indexes.tolist() == list(range(10))
    assert len(neighbourhoods.anchor_indexes) == 0


def test_discover_buffers_lookup_and_consistency():
    n, num_anchors, k = 20, 6, 2
    neighbourhoods, memory, labels, consistency = _discovered(n=n, num_anchors=num_anchors, k=k)
    assert {name for name, _ in neighbourhoods.named_buffers()} == BUFFERS
    assert set(neighbourhoods.state_dict()) == BUFFERS
    assert int(neighbourhoods.samples_num) == n
    ref_entropy = entropy_reference(memory, 0.1)
    torch.testing.assert_close(neighbourhoods.entropy.double(), ref_entropy, rtol=1e-4, atol=1e-4)
    anchors = neighbourhoods.anchor_indexes.tolist()
    assert sorted(anchors) == sorted(ref_entropy.argsort()[:num_anchors].tolist())
    assert sorted(neighbourhoods.instance_indexes.tolist()) == sorted(set(range(n)) - set(anchors))
    assert neighbourhoods.neighbours.shape == (num_anchors, k)
    # position: an anchor's row in neighbours, or −1 − its row in instance_indexes
    for row, a in enumerate(anchors):
        assert int(neighbourhoods.position[a]) == row
        assert neighbourhoods.neighbours[row].tolist() == neighbours_reference(memory, a, k)
    for row, i in enumerate(neighbourhoods.instance_indexes.tolist()):
        assert int(neighbourhoods.position[i]) == -1 - row

    instances = neighbourhoods.instance_indexes.tolist()
    batch = torch.tensor([anchors[2], instances[0], anchors[0], instances[5]])
    neighbours, is_anchor = neighbourhoods.lookup(batch)
    assert is_anchor.tolist() == [True, False, True, False]
    assert neighbours[0].tolist() == neighbours_reference(memory, anchors[2], k)
    assert neighbours[2].tolist() == neighbours_reference(memory, anchors[0], k)

    # consistency: share of (anchor, neighbour) pairs whose labels agree
    agree = [int(labels[nb] == labels[a]) for a in anchors for nb in neighbours_reference(memory, a, k)]
    expected = sum(agree) / len(agree)
    assert 0 < expected < 1  # precondition: the check can tell the share from 0 or 1
    assert consistency == pytest.approx(expected)
    assert float(neighbourhoods.consistency) == pytest.approx(expected)


@pytest.mark.parametrize("fresh_anchors", [0, 3, 11])
def test_state_dict_round_trip_with_another_number_of_anchors(fresh_anchors):
    neighbourhoods, memory, _, _ = _discovered(num_anchors=6)
    state = {key: value.clone() for key, value in neighbourhoods.state_dict().items()}
    fresh = AnchorNeighbourhoods(20, neighbourhood_size=2)
    if fresh_anchors:
        fresh.discover(_memory(9), 0.1, fresh_anchors)
    assert len(fresh.anchor_indexes) == fresh_anchors
    fresh.load_state_dict(state)
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    batch = torch.arange(20)
    n1, a1 = neighbourhoods.lookup(batch)
    n2, a2 = fresh.lookup(batch)
    assert torch.equal(a1, a2) and a2.sum() == 6
    assert torch.equal(n1[a1], n2[a2])


def test_consistency_leaves_out_unlabelled_images():
    """STL-10's unlabelled split carries label -1: those pairs say nothing about label consistency."""
    memory = torch.nn.functional.normalize(torch.randn(12, 4, dtype=torch.float64), dim=1)
    labels = torch.arange(12) % 3
    neighbourhoods = AnchorNeighbourhoods(12, 2)
    full = neighbourhoods.discover(memory, 0.1, 6, labels)
    hidden = labels.clone()
    hidden[neighbourhoods.neighbours[0]] = -1  # the first anchor's neighbours lose their labels
    partial = neighbourhoods.discover(memory, 0.1, 6, hidden)
    known = (hidden[neighbourhoods.neighbours] >= 0) & (hidden[neighbourhoods.anchor_indexes] >= 0).unsqueeze(1)
    agree = labels[neighbourhoods.neighbours] == labels[neighbourhoods.anchor_indexes].unsqueeze(1)
    assert partial == pytest.approx(agree[known].double().mean().item())
    assert full == pytest.approx(agree.double().mean().item())
    assert neighbourhoods.discover(memory, 0.1, 6, torch.full((12,), -1)) == 0.0


@pytest.mark.parametrize("parts", [2, 3, 7])
@pytest.mark.parametrize("num_rows, chunk_size", [(20, 3), (20, 20), (50, 7)])
def test_parts_take_every_block_pair_and_row_once_in_balanced_shares(parts, num_rows, chunk_size):
    shares = [block_pairs(num_rows, chunk_size, (p, parts)) for p in range(parts)]
    every = block_pairs(num_rows, chunk_size)
    assert sorted(pair for share in shares for pair in share) == sorted(every)
    assert all(i <= j for i, j in every) and len(every) == len(set(every))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    rows = [part_rows(num_rows, (p, parts)) for p in range(parts)]
    assert rows[0][0] == 0 and rows[-1][1] == num_rows and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    assert max(b - a for a, b in rows) - min(b - a for a, b in rows) <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("unit", [True, False])
@pytest.mark.parametrize("parts", [2, 3])
def test_partial_entropy_sums_add_up_to_one_part(dtype, unit, parts):
    """What the parts of a split discovery add up (``discover_neighbourhoods``): the one-part sums and entropy,
    to the rounding of the additions' order; one part is ``sample_entropy`` bit for bit."""
    memory = _memory(3, n=40, unit=unit, dtype=dtype)
    temperature = 0.1 if unit else 0.05  # not unit: large enough to take the shifted rows
    one = entropy_sums(memory, temperature, chunk_size=6)
    assert torch.equal(entropy_from_sums(*one), sample_entropy(memory, temperature, chunk_size=6))
    shares = [entropy_sums(memory, temperature, chunk_size=6, part=(p, parts)) for p in range(parts)]
    if not unit:  # shifted rows: each row's sums whole in one part
        assert sum(int(share[0].count_nonzero()) for share in shares) == len(memory)
    total, weighted = (sum(share[k] for share in shares) for k in range(2))
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(total, one[0], **tol)
    torch.testing.assert_close(weighted, one[1], **tol)
    torch.testing.assert_close(entropy_from_sums(total, weighted), sample_entropy(memory, temperature, chunk_size=6),
                               **tol)
    torch.testing.assert_close(entropy_from_sums(total, weighted).double(), entropy_reference(memory, temperature),
                               **tol)


class ThreadParts(Collectives):
    """Collective operations between threads of this process: each thread is one part, the exchanges meet
    at a barrier. Another implementation than engine/distributed.py's, for the same interface."""

    def __init__(self, index, parts, slots, barrier):
        self.part = (index, parts)
        self.slots, self.barrier = slots, barrier

    def _exchange(self, tensor):
        self.slots[self.part[0]] = tensor
        self.barrier.wait()
        every = list(self.slots)
        self.barrier.wait()  # nobody writes the next exchange before all have read this one
        return every

    def broadcast(self, tensor):
        return self._exchange(tensor)[0].clone()

    def all_reduce_sum(self, tensor):
        every = self._exchange(tensor)
        return sum(every[1:], every[0].clone())

    def gather_rows(self, tensor):
        return torch.cat(self._exchange(tensor))


def split_discovery(memory, parts, num_anchors, k, labels, chunk_size):
    """Every part's buffers after ``AnchorNeighbourhoods.discover`` split over ``parts`` threads; part p
    gets ``memory + p`` (only part 0's bank may count)."""
    slots, barrier = [None] * parts, threading.Barrier(parts, timeout=60)
    results = [None] * parts

    def run(index):
        found = AnchorNeighbourhoods(len(memory), k)
        consistency = found.discover(memory + index, 0.1, num_anchors, labels,
                                     collectives=ThreadParts(index, parts, slots, barrier))
        results[index] = {**found.state_dict(), "returned": consistency}

    threads = [threading.Thread(target=run, args=(index,)) for index in range(parts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.parametrize("unit", [True, False])
@pytest.mark.parametrize("parts", [2, 3])
def test_discovery_split_by_any_collectives_is_the_one_part_discovery(monkeypatch, unit, parts):
    """The method's own discover, split over parts through the collectives interface (threads here), gives
    every part the same buffers, and those of one part on part 0's bank (entropies to the rounding of the
    additions' order). 7 anchors do not split evenly into 2 or 3 shares."""
    import lib.neighbourhoods
    monkeypatch.setattr(lib.neighbourhoods, "BLOCK", 4)  # 5 x 5 blocks: every part has block pairs
    memory = _memory(6, n=20, unit=unit, dtype=torch.float64)
    labels = torch.arange(20) % 3
    results = split_discovery(memory, parts, 7, 3, labels, None)
    one = AnchorNeighbourhoods(20, 3)
    returned = one.discover(memory, 0.1, 7, labels, collectives=ONE_PROCESS)
    for result in results:
        assert all(torch.equal(result[name], results[0][name]) for name in BUFFERS)
        torch.testing.assert_close(result["entropy"], one.entropy, **TOLERANCE[torch.float64])
        for name in BUFFERS - {"entropy"}:
            assert torch.equal(result[name], getattr(one, name)), name
        assert result["returned"] == returned
    assert results[0]["neighbours"].shape == (7, 3)
