"""The operations the method shares between cooperating processes, as one small interface.

The method's functions that can split their work (``lib.neighbourhoods.discover_neighbourhoods``) take a
``Collectives`` and compute their share ``part``; the default, ``ONE_PROCESS``, is the whole work in one
process and every operation returns its input. Another implementation (engine/distributed.py) joins the
shares of several processes.
"""


class Collectives:
    """One process: the whole work, nothing to exchange.

    An implementation for P processes sets ``part = (rank, P)`` and gives every process the same results:
    ``broadcast`` rank 0's tensor, ``all_reduce_sum`` the element-wise sum over the processes, and
    ``gather_rows`` every process's rows (their counts may differ) concatenated in rank order.
    """

    part = (0, 1)

    def broadcast(self, tensor):
        """Rank 0's ``tensor`` (same shape and dtype on every process); ``tensor`` itself is left unchanged."""
        return tensor

    def all_reduce_sum(self, tensor):
        """The element-wise sum of ``tensor`` over the processes (it may be written in place)."""
        return tensor

    def gather_rows(self, tensor):
        """Every process's rows of ``tensor`` along dim 0, in rank order."""
        return tensor


ONE_PROCESS = Collectives()
