"""Recent per-step values of a lab.trainer population, and the oscillation tags derived from them.

The oscillation tags of a log row at step s look back over the last `window` steps:

    oscillation/flip_rate        share of those steps whose update reversed direction, per parameter
                                 (metrics.flip_rate: reversals of u_{t-1}, u_t for t in [max(1, s-W), s-1])
    oscillation/loss_amplitude   (max - min) / |mean| of the losses of steps s-W+1 .. s
    oscillation/param_amplitude  largest (max - min) of any parameter over steps s-W+1 .. s

`History` keeps each run's loss and parameters (or, for models too large to keep, its share of reversing
parameters) of the recent steps in a ring, and derives the three tags for every pending row of a flush at
once. Computed at each row's own step they were ~30 small tensor ops per row, ~0.3 ms of a ~1 ms row
for 200 runs on a CPU (most of it per-op overhead, and twice that at the default cadence, where the
row's code is cold); at a flush they are the same ~30 ops for all of its rows together. The ring holds
`capacity` steps, and the trainer flushes early when a pending row's window would be overwritten
(`must_flush`).
"""

from __future__ import annotations

import torch

from lab.metrics import amplitude_ratio, reversal_counts

# Where a flush's windows together hold more than this many times the steps they span (rows close together,
# as with a row every step), they come from `_sliding` (~log2(window) ops over the span) instead of one
# gather of every window (rows x window values).
_DENSE = 4


def _sliding(values: torch.Tensor, width: int, op) -> torch.Tensor:
    """op (torch.maximum, torch.minimum or torch.add) over every `width` consecutive rows of values [L, ...]:
    [L - width + 1, ...], row j for rows j .. j + width - 1.

    By doubling: level k holds op over 2^k consecutive rows (one op on the level below), and a window is
    op of the levels of width's binary digits side by side: about log2(width) + popcount(width) ops of
    [L, ...] each, against one of [rows, ..., width] for a gather of the windows. Max and min come out
    exact; a sum is summed in another order than torch.sum's (a few roundings apart)."""
    count = values.shape[0] - width + 1
    result, level, size, offset, rest = None, values, 1, 0, width
    while True:
        if rest & 1:
            piece = level[offset:offset + count]
            result = piece if result is None else op(result, piece)
            offset += size
        rest >>= 1
        if not rest:
            return result
        level = op(level[:-size], level[size:])
        size *= 2


def _largest_range(high: torch.Tensor, low: torch.Tensor, _mean=None) -> torch.Tensor:
    """metrics.param_amplitude from a window's max and min [S, N, P]: the largest max - min of any parameter."""
    return (high - low).amax(-1)


class History:
    """Ring of the last `capacity` steps' losses [C, N] and parameters [C, N, P] (or reversal shares [C, N]).

    track_params: keep the parameters (flip rate and parameter amplitude computed from them at a flush);
    else the trainer records each step's share of reversing parameters (`record_flips`) and the
    parameter amplitude is NaN (an MLP's parameters are too many to keep `capacity` copies of).
    """

    def __init__(self, n_runs: int, n_params: int, window: int, capacity: int, track_params: bool,
                 dtype: torch.dtype, device: torch.device):
        if capacity < window + 2:
            raise ValueError(f"capacity {capacity} < window + 2 = {window + 2}: a row reads window + 2 steps")
        self.window, self.capacity = window, capacity
        self.loss = torch.zeros(capacity, n_runs, dtype=dtype, device=device)
        self.params = torch.zeros(capacity, n_runs, n_params, dtype=dtype, device=device) if track_params else None
        self.flips = None if track_params else torch.zeros(capacity, n_runs, dtype=dtype, device=device)
        # One view per slot, made once: `record` runs every step, and a copy into a view costs half of
        # an indexed assignment (~1.7 against ~3 us on a CPU, mostly Python's indexing).
        self._loss_at = self.loss.unbind(0)
        self._params_at = None if self.params is None else self.params.unbind(0)

    def first_needed(self, row_step: int) -> int:
        """The oldest step a row at `row_step` reads: window + 2 parameter vectors end at it."""
        return max(0, row_step - self.window - 1)

    def must_flush(self, oldest_pending_row: int, next_row: int | None) -> bool:
        """Whether the steps up to the next row would overwrite what the oldest pending row reads."""
        return next_row is not None and next_row >= self.first_needed(oldest_pending_row) + self.capacity

    def record(self, step: int, loss: torch.Tensor, P: torch.Tensor) -> None:
        """Keep step's loss [N] and, when tracked, its parameters [N, P] (before the step's update)."""
        slot = step % self.capacity
        self._loss_at[slot].copy_(loss)
        if self._params_at is not None:
            self._params_at[slot].copy_(P)

    def record_flips(self, step: int, share: torch.Tensor) -> None:
        """Keep the share of parameters [N] whose update at `step` reversed the one before (untracked models)."""
        self.flips[step % self.capacity] = share

    def _consecutive(self, ring: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Rows of `ring` for steps first..last in step order: [last - first + 1, ...]."""
        steps = torch.arange(first, last + 1, device=ring.device)
        return ring[steps % self.capacity]

    def tags(self, row_steps: list[int]) -> torch.Tensor:
        """[3, S, N]: flip rate, loss amplitude and parameter amplitude of the rows at `row_steps` (ascending)."""
        W, first, last = self.window, self.first_needed(row_steps[0]), row_steps[-1]
        loss = self._consecutive(self.loss, first, last)  # [L, N], row i = step first + i
        if self.params is not None:
            params = self._consecutive(self.params, first, last)  # [L, N, P]
            # reversals of the pair (u_{t-1}, u_t), t = first + 1 .. last - 1, summed over parameters
            reversals = reversal_counts(params)  # [L - 2, N]
            per_step, t0, n_params = reversals, first + 1, params.shape[-1]
        else:
            params = None
            per_step, t0, n_params = self._consecutive(self.flips, first, last), first, 1  # row i = step first + i
        flip = self._window_sums(per_step, t0, row_steps)
        flip = flip / per_step.new_tensor([max(min(s, W), 1) * n_params for s in row_steps])[:, None]
        # metrics.relative_amplitude and metrics.param_amplitude, from each window's max, min (and mean)
        loss_amplitude = self._windows(loss, first, row_steps, amplitude_ratio, mean=True)
        if params is None:
            amplitude = torch.full_like(loss_amplitude, float("nan"))
        else:
            amplitude = self._windows(params, first, row_steps, _largest_range, mean=False)
        return torch.stack([flip, loss_amplitude, amplitude])

    def _window_sums(self, per_step: torch.Tensor, t0: int, row_steps: list[int]) -> torch.Tensor:
        """sum of per_step over t in [max(1, s - W), s - 1] for each row step s: [S, N].

        per_step [m, N] holds steps t0 .. t0 + m - 1. Prefix sums in float64: the values are counts of
        reversals (or shares of them), so the differences of the prefix sums are exact (or within a few
        float64 roundings of the shares' sum)."""
        N = per_step.shape[1]
        prefix = torch.cat([per_step.new_zeros(1, N, dtype=torch.float64), per_step.double().cumsum(0)])
        lo = [max(1, s - self.window) - t0 for s in row_steps]  # prefix[i] = sum of per_step rows < i
        hi = [max(s - t0, lo_i) for s, lo_i in zip(row_steps, lo)]  # exclusive end; empty where s <= 1
        lo_idx = torch.tensor(lo, device=per_step.device).clamp_(0, prefix.shape[0] - 1)
        hi_idx = torch.tensor(hi, device=per_step.device).clamp_(0, prefix.shape[0] - 1)
        return (prefix[hi_idx] - prefix[lo_idx]).to(per_step.dtype)

    def _windows(self, values: torch.Tensor, first: int, row_steps: list[int], combine, mean: bool) -> torch.Tensor:
        """combine(max, min, mean or None) of each row's last `window` steps (fewer before step window - 1): [S, N].

        values [L, N, ...] holds steps first .. first + L - 1; combine reduces the window's max and min
        [S', N, ...] (and its mean where `mean`) to [S', N]. Rows with a full window: where they lie close
        together, max, min and sum by doubling (`_sliding`); else gathered as one [S', N, ..., W] tensor
        from the windows view (no copy of the overlapping windows before the gather)."""
        W, out = self.window, []
        full = [s for s in row_steps if s + 1 >= W]
        early = [s for s in row_steps if s + 1 < W]  # only the first flush has these: a loop is fine
        for s in early:
            window = values[:s + 1 - first].movedim(0, -1)
            out.append(combine(window.amax(-1), window.amin(-1), window.mean(-1) if mean else None))
        if full:
            starts = torch.tensor([s - W + 1 - first for s in full], device=values.device)
            if len(full) * W > _DENSE * values.shape[0]:  # rows close together: windows by doubling
                high, low = (_sliding(values, W, op)[starts] for op in (torch.maximum, torch.minimum))
                out.append(combine(high, low, _sliding(values, W, torch.add)[starts] / W if mean else None))
            else:
                windows = values.unfold(0, W, 1)[starts]  # [S', N, ..., W]
                out.append(combine(windows.amax(-1), windows.amin(-1), windows.mean(-1) if mean else None))
        return torch.cat([o.reshape(-1, values.shape[1]) for o in out])

