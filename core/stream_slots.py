"""Sizes and slot arithmetic of the weight streamer (core/streaming.py), without torch.

How many bytes a module holds, how far ahead n cyclically streamed blocks are copied and which device slot each
uses. core/memory.py sizes its estimates with the same functions, so the two never disagree.
"""
from __future__ import annotations

GiB = 1024**3


def module_bytes(module) -> int:
    """Bytes of a module's parameters and buffers (0 for None)."""
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def slot_count(n: int, ahead: int) -> int:
    """Device slots of n cyclically streamed blocks copied `ahead` blocks ahead (as slot_plan lays them out): one per
    block in flight, plus n % (ahead + 1) so that the wrap-around into the next call never reuses a busy slot."""
    return min(n, ahead + 1 + n % (ahead + 1))


def fit_lookahead(n: int, lookahead: int) -> int:
    """Blocks copied ahead of the one computing, for n streamed blocks: at most `lookahead` and a fifth of n (past
    that most blocks would sit in slots anyway); among the values down to three quarters of that, the one needing
    the fewest device slots (SDXL's 70 blocks take 10 slots at 9 ahead but 18 at 12 ahead)."""
    top = max(1, min(lookahead, n // 5))
    return min(range(max(1, -(-3 * top // 4)), top + 1), key=lambda a: (slot_count(n, a), -a))


def slot_plan(n: int, lookahead: int) -> list[int]:
    """Device slot of each of n cyclically streamed blocks, such that any lookahead+1 cyclically consecutive
    blocks (the one computing and those prefetched) sit in distinct slots: j % S with S = lookahead+1, and the
    last n % S blocks in extra slots so the wrap-around to block 0 never lands on a slot still in use."""
    size = lookahead + 1
    if n <= size:
        return list(range(n))
    tail = n % size
    return [j % size if j < n - tail else size + (j - (n - tail)) for j in range(n)]
