"""Compiled CPU kernels for the server's streaming operators: ``unify`` and the fused server round.

Why a compiler: on CPU the operators are memory-bound in principle (every input is read once), but written as torch
calls on cache-sized slices they pay a kernel launch, a temporary and a pass over the slice for every step (sum,
sign, product, clamp, count, mask, pack, two reductions): 17x the memory-copy floor for ``unify`` and 56x for the
server round at 30 x 22M parameters. Here one compiled loop per block of columns reads the inputs once from memory
and does every step from cache, with the blocks spread over the cores (``numba``'s ``prange``).

Arithmetic contract (the tests hold every kernel to it against the torch operators):

- The election sum, the magnitudes, the masks and tau_u are bit-identical to ``modulators.unify``'s torch path:
  float32 sums accumulated task by task in input order, the same tie rules, a single rounding per operation and no
  fused multiply-add. Nothing is compiled with ``fastmath``: a reassociated float reduction would vectorise, but its
  association (hence its last bits) would then depend on the memory alignment of each scratch buffer, which varies
  from run to run. Reductions are tree sums instead (``_tree_sum``): vectorised, with a fixed association.
- Rescaler sums (sum|tau_i|, sum|m_i tau_u|) and Gram products are float32 tree sums within a block, added into
  float64 per group of blocks and reduced in group order: equal to the torch path to ~1e-6
  relative, the same on every run and any number of threads; a single task's two sums are made in one loop from
  equal terms, so its rescaler is exactly 1.0.
- Server averages are ``((u * r) masked) * w`` accumulated in upload order, then divided by the summed weight, all in
  float32: exactly what the torch form of ``aggregation.server_round`` computes.

Work is split into a fixed number of contiguous groups of blocks (``N_GROUPS``), not one per thread, so partial sums
and therefore every output are the same on any number of cores.
"""

from __future__ import annotations

import os

import numpy as np

try:  # numba is a requirement; the import guard keeps the library usable (torch path) where it is missing
    import numba
    from numba import njit, prange
    from numba.typed import List as TypedList

    # numba's OpenMP layer sets the OpenMP thread count that torch shares: after one kernel, torch ran on every
    # core despite OMP_NUM_THREADS=1, and two training processes on 2 cores ran 50x slower (measured). numba's
    # own pool ("workqueue") leaves OpenMP alone; NUMBA_THREADING_LAYER still overrides the choice.
    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "workqueue"
    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only without numba
    AVAILABLE = False

N_GROUPS = 64  # contiguous groups of blocks: the unit of parallel work and of partial sums (thread-count free)
CACHE_BYTES = 1 << 18  # a (tasks x block) float32 buffer of ~256 KiB sits in a core's L2 with its scratch rows

TIE_NEGATIVE, TIE_POSITIVE, TIE_ZERO = -1, 1, 0
TIES = {"negative": TIE_NEGATIVE, "positive": TIE_POSITIVE, "zero": TIE_ZERO}
MASK_NONE, MASK_PACKED, MASK_BOOL = 0, 1, 2
FLOAT32_MAX = float(np.finfo(np.float32).max)


def block_columns(n_rows: int) -> int:
    """Columns per block: a multiple of 8 (whole bytes of packed masks) whose (rows x block) buffer fits L2."""
    cols = max(64, CACHE_BYTES // (4 * max(1, n_rows)))
    return cols - cols % 64


if AVAILABLE:

    @njit(cache=True)
    def _copy(dst, src, w):
        """dst[:w] = src[:w] as a loop: numba's slice assignment runs ~50x slower than this (measured)."""
        for j in range(w):
            dst[j] = src[j]

    @njit(cache=True)
    def _fill(dst, w, value):
        """dst[:w] = value as a loop (see ``_copy``)."""
        for j in range(w):
            dst[j] = value

    @njit(cache=True)
    def _count_not_finite(x, w):
        """Entries of x[:w] that are Inf or NaN (an integer count: vectorises without reassociating floats)."""
        bad = 0
        for j in range(w):
            bad += 1 if x[j] - x[j] != 0 else 0  # x - x is 0 for finite x, NaN otherwise
        return bad

    @njit(cache=True)
    def _tree_sum(x, w):
        """Sum of x[:w] (destroyed) by halving: every pass is an element-wise add, so it vectorises without
        reassociating anything and the association depends on w alone."""
        n = w
        while n > 1:
            half = n // 2
            lo = x[:half]
            hi = x[half : 2 * half]  # slices, not x[j + half]: numba vectorises only loops over a view's own index
            for j in range(half):
                lo[j] = lo[j] + hi[j]
            if n % 2:
                x[0] = x[0] + x[n - 1]
            n = half
        return np.float64(x[0]) if w > 0 else 0.0

    @njit(cache=True)
    def _abs_sum(x, w, tmp):
        """sum_j |x[j]| over the first w entries as a float32 tree sum (float64 result): the rescaler numerator of
        a task over one block, made once per task rather than once per download group that holds it."""
        for j in range(w):
            tmp[j] = abs(x[j])
        return _tree_sum(tmp, w)

    @njit(cache=True, inline="always")
    def _pair_column(a, b, majority, mean, ftie):
        """One column of a two-task unification: t - t for the election sum t = a + b (0 unless t is not finite),
        the elected sign e, the entries aligned with it (p = a e, q = b e) and the elected magnitude mu."""
        zero = np.float32(0.0)
        one = np.float32(1.0)
        t = a + b
        check = t - t
        if majority:
            t = (one if a > 0 else (-one if a < 0 else zero)) + (one if b > 0 else (-one if b < 0 else zero))
        e = one if t > 0 else (-one if t < 0 else ftie)
        p = a * e
        q = b * e
        if mean:
            mu = (p if p > 0 else zero) + (q if q > 0 else zero)
            cnt = (one if p > 0 else zero) + (one if q > 0 else zero)
            mu = mu / (cnt if cnt > 1.0 else one)
        else:
            mu = p if p > 0 else zero
            mu = q if q > mu else mu
        return check, e, p, q, mu

    @njit(cache=True)
    def _unify_pair(x0, x1, w, majority, tie, mean, use_masks, check, ou, m0, m1, t0, t1, flags):
        """``_unify_block`` for two rows and bool masks in one pass over the columns (a client holding two tasks:
        the ``gpu`` preset's case): the same operations in the same order per column, so the same bits, with the
        rescaler denominators' terms left in ``t0``/``t1`` for the caller's tree sums. Returns the number of
        non-finite sums (the outputs are then to be discarded). They are flagged per column in ``flags`` and counted
        after the loop: a running count inside it keeps the loop from vectorising (2x slower, measured).
        ``check=False`` skips the flags where the caller has ruled out a non-finite sum (15-40% faster, measured).
        One loop per setting: a mask test inside the loop converted every comparison to bytes and back (15% slower,
        measured)."""
        zero = np.float32(0.0)
        ftie = np.float32(tie)
        if use_masks and not check:
            for j in range(w):
                _, e, p, q, mu = _pair_column(x0[j], x1[j], majority, mean, ftie)
                ou[j] = e * mu
                t0[j] = mu if p > 0 else zero
                t1[j] = mu if q > 0 else zero
                m0[j] = 1 if p > 0 else 0
                m1[j] = 1 if q > 0 else 0
            return 0
        if use_masks:
            for j in range(w):
                nonzero, e, p, q, mu = _pair_column(x0[j], x1[j], majority, mean, ftie)
                flags[j] = 1 if nonzero != 0 else 0
                ou[j] = e * mu
                t0[j] = mu if p > 0 else zero
                t1[j] = mu if q > 0 else zero
                m0[j] = 1 if p > 0 else 0
                m1[j] = 1 if q > 0 else 0
        else:
            for j in range(w):
                nonzero, e, p, q, mu = _pair_column(x0[j], x1[j], majority, mean, ftie)
                flags[j] = 1 if nonzero != 0 else 0
                ou[j] = e * mu
                t0[j] = mu
                t1[j] = mu
                m0[j] = 1
                m1[j] = 1
        bad = 0
        for j in range(w):
            bad += flags[j]
        return bad

    @njit(cache=True)
    def _unify_block(
        buf,
        rows,
        w,
        majority,
        tie,
        mean,
        use_masks,
        pack,
        out_u,
        out_m,
        col,
        num,
        den,
        slot,
        total,
        mu,
        cnt,
        bits,
        tmp,
        absum,
    ):
        """Elect, mask and rescale rows ``rows`` of ``buf[:, :w]`` (float32, in cache); write tau_u to
        ``out_u[col:col+w]``, masks to ``out_m[slot + i]`` (packed bytes from col // 8, or bool bytes from col), and
        add the rescaler sums to ``num[slot + i]`` / ``den[slot + i]``. Returns False if a sum is not finite.
        ``absum[r]`` is ``_abs_sum`` of ``buf[r, :w]`` (the numerators' terms, made by the caller once per row).

        2 + 3 x rows passes over the block: each first-row pass also initialises (0 + x is x, so the sums are
        those of the torch form, which starts from zeros)."""
        n_rows = rows.shape[0]
        zero = np.float32(0.0)
        one = np.float32(1.0)
        if n_rows == 2 and not pack:
            # finite rows whose |entries| sum below float32's largest value cannot overflow their election sum: every
            # partial sum of the (float32, non-negative) tree sums is at least its largest term, so |a + b| <= absum
            check = not (absum[rows[0]] + absum[rows[1]] < FLOAT32_MAX)
            if _unify_pair(
                buf[rows[0]],
                buf[rows[1]],
                w,
                majority,
                tie,
                mean,
                use_masks,
                check,
                out_u[col : col + w],
                out_m[slot][col : col + w],
                out_m[slot + 1][col : col + w],
                mu,
                tmp,
                bits,
            ):
                return False
            num[slot] += absum[rows[0]]
            den[slot] += _tree_sum(mu, w)
            num[slot + 1] += absum[rows[1]]
            den[slot + 1] += _tree_sum(tmp, w)
            return True
        x = buf[rows[0]]
        _copy(total, x, w)
        for i in range(1, n_rows):
            x = buf[rows[i]]
            for j in range(w):
                total[j] += x[j]
        if majority:  # the sum above only served the finite check
            if _count_not_finite(total, w):
                return False
            _fill(total, w, zero)
            for i in range(n_rows):
                x = buf[rows[i]]
                for j in range(w):
                    total[j] += one if x[j] > 0 else (-one if x[j] < 0 else zero)
        if not majority and _count_not_finite(total, w):
            return False
        ftie = np.float32(tie)
        for j in range(w):  # total becomes the elected sign (float32 +-1, or 0 for a tie under tie="zero")
            t = total[j]
            total[j] = one if t > 0 else (-one if t < 0 else ftie)
        for i in range(n_rows):
            x = buf[rows[i]]
            if i == 0:
                if mean:
                    for j in range(w):
                        p = x[j] * total[j]
                        mu[j] = p if p > 0 else zero
                        cnt[j] = one if p > 0 else zero
                else:
                    for j in range(w):
                        p = x[j] * total[j]
                        mu[j] = p if p > 0 else zero
            elif mean:
                for j in range(w):
                    p = x[j] * total[j]
                    mu[j] += p if p > 0 else zero
                    cnt[j] += one if p > 0 else zero
            else:
                for j in range(w):
                    p = x[j] * total[j]
                    mu[j] = p if p > mu[j] else mu[j]
        ou = out_u[col : col + w]
        for j in range(w):
            if mean:
                mu[j] = mu[j] / (cnt[j] if cnt[j] > 1.0 else one)
            ou[j] = total[j] * mu[j]
        for i in range(n_rows):
            x = buf[rows[i]]
            m = out_m[slot + i]
            # both rescaler sums as tree sums of per-column terms: vectorised with a fixed association (a compiler's
            # reassociated reduction depends on memory alignment), and one task's num and den are equal
            if pack:
                for j in range(w):
                    agree = x[j] * total[j] > 0 or not use_masks
                    tmp[j] = mu[j] if agree else zero
                    bits[j] = 1 if agree else 0
                _fill(bits[w:], 8, np.uint8(0))  # the last slice pads to whole bytes with zeros (as pack_mask)
                mb = m[col // 8 : col // 8 + (w + 7) // 8]
                for k in range((w + 7) // 8):
                    b = bits[8 * k : 8 * k + 8]
                    mb[k] = (
                        b[0]
                        | (b[1] << 1)
                        | (b[2] << 2)
                        | (b[3] << 3)
                        | (b[4] << 4)
                        | (b[5] << 5)
                        | (b[6] << 6)
                        | (b[7] << 7)
                    )
            else:
                mb = m[col : col + w]
                for j in range(w):
                    agree = x[j] * total[j] > 0 or not use_masks
                    tmp[j] = mu[j] if agree else zero
                    mb[j] = 1 if agree else 0
            num[slot + i] += absum[rows[i]]
            den[slot + i] += _tree_sum(tmp, w)
        return True

    @njit(parallel=True, cache=True)
    def unify_kernel(vectors, n, block, majority, tie, mean, use_masks, pack, out_u, out_m, num, den, bad):
        """``modulators.unify`` over whole vectors (a typed list of float32 arrays of length n)."""
        n_rows = len(vectors)
        n_blocks = (n + block - 1) // block
        per = (n_blocks + N_GROUPS - 1) // N_GROUPS
        rows = np.arange(n_rows)
        for g in prange(N_GROUPS):
            buf = np.empty((n_rows, block), np.float32)
            total = np.empty(block, np.float32)
            mu = np.empty(block, np.float32)
            cnt = np.empty(block, np.float32)
            bits = np.empty(block + 8, np.uint8)
            tmp = np.empty(block, np.float32)
            absum = np.empty(n_rows, np.float64)
            for bi in range(g * per, min((g + 1) * per, n_blocks)):
                a = bi * block
                w = min(block, n - a)
                for i in range(n_rows):  # the one read of the inputs
                    _copy(buf[i], vectors[i][a : a + w], w)
                    absum[i] = _abs_sum(buf[i], w, tmp)
                if not _unify_block(
                    buf,
                    rows,
                    w,
                    majority,
                    tie,
                    mean,
                    use_masks,
                    pack,
                    out_u,
                    out_m,
                    a,
                    num[g],
                    den[g],
                    0,
                    total,
                    mu,
                    cnt,
                    bits,
                    tmp,
                    absum,
                ):
                    bad[g] = 1

    @njit(cache=True)
    def _accumulate(row, u, a, w, r, wt, kind, mk, first, bits):
        """row[:w] (+)= ((u[a:a+w] * r) masked) * wt, one specialised loop per mask kind so that each vectorises.
        No fastmath: ``(u * r) * wt`` must be rounded twice, in this order, as the torch form does."""
        zero = np.float32(0.0)
        # every loop indexes views by their own index: an offset index (u[a + j]) keeps numba from vectorising
        us = u[a : a + w]
        if kind == MASK_PACKED:  # expand the bits of the slice to bytes first (a is a multiple of 8)
            packed = mk[a >> 3 : (a >> 3) + (w + 7) // 8]
            for k in range((w + 7) // 8):
                byte = packed[k]
                for bit in range(8):
                    bits[8 * k + bit] = (byte >> bit) & 1
            src = bits[:w]
        elif kind == MASK_BOOL:
            src = mk[a : a + w]
        else:
            src = bits[:w]  # unused: typed like the others
        if kind == MASK_NONE:
            if first:
                for j in range(w):
                    row[j] = (us[j] * r) * wt
            else:
                for j in range(w):
                    row[j] = row[j] + (us[j] * r) * wt
        elif first:
            for j in range(w):
                part = us[j] * r
                row[j] = (part if src[j] != 0 else zero) * wt
        else:
            for j in range(w):
                part = us[j] * r
                row[j] = row[j] + (part if src[j] != 0 else zero) * wt

    @njit(cache=True)
    def _divide(row, w, total, tmp):
        """row[:w] /= total; returns ``_abs_sum`` of the result, which is not finite if an average is not (an
        overflowing average; or, for finite averages, |entries| summing past float32's range, which the server's
        screening of uploads rules out) -- the check and the rescaler numerator in one pass."""
        for j in range(w):
            r = row[j] / total
            row[j] = r
            tmp[j] = abs(r)
        return _tree_sum(tmp, w)

    @njit(cache=True)
    def _gram_block(buf, w, sign, gram, signs, tmp):
        """gram[p, q] += sum_j f(buf[p, j]) f(buf[q, j]) for q >= p over the first w columns (f = sign or identity):
        float32 tree sums within the block, float64 across blocks. ``signs`` holds f(buf) when f = sign."""
        t = buf.shape[0]
        src = buf
        if sign:
            for p in range(t):
                x = buf[p]
                y = signs[p]
                for j in range(w):
                    y[j] = np.float32(1.0) if x[j] > 0 else (np.float32(-1.0) if x[j] < 0 else np.float32(0.0))
            src = signs
        # the tree sum's first two halvings are done as the products are made (the same additions in the same order,
        # so the same bits): with s = w / 4 and P_k[j] = x[j + k s] y[j + k s],
        # tmp[j] = (P_0 + P_2) + (P_1 + P_3), then a tree sum of s entries. Rows p and p + 1 share each read of row q.
        if w % 4 == 0:
            s = w // 4
            p = 0
            while p < t:
                x = src[p]
                x0, x1, x2, x3 = x[:s], x[s : 2 * s], x[2 * s : 3 * s], x[3 * s : 4 * s]
                for j in range(s):
                    tmp[j] = (x0[j] * x0[j] + x2[j] * x2[j]) + (x1[j] * x1[j] + x3[j] * x3[j])
                gram[p, p] += _tree_sum(tmp, s)
                if p + 1 == t:
                    break
                z = src[p + 1]
                z0, z1, z2, z3 = z[:s], z[s : 2 * s], z[2 * s : 3 * s], z[3 * s : 4 * s]
                t2 = tmp[s : 2 * s]
                for q in range(p + 1, t):
                    y = src[q]
                    y0, y1, y2, y3 = y[:s], y[s : 2 * s], y[2 * s : 3 * s], y[3 * s : 4 * s]
                    for j in range(s):
                        a0, a1, a2, a3 = y0[j], y1[j], y2[j], y3[j]
                        tmp[j] = (x0[j] * a0 + x2[j] * a2) + (x1[j] * a1 + x3[j] * a3)
                        t2[j] = (z0[j] * a0 + z2[j] * a2) + (z1[j] * a1 + z3[j] * a3)
                    gram[p, q] += _tree_sum(tmp, s)
                    gram[p + 1, q] += _tree_sum(t2, s)
                p += 2
            return
        # otherwise (a vector's last block) the first halving only: tmp[j] = P[j] + P[j + h], then the odd last column
        h = w // 2
        for p in range(t):
            x = src[p]
            xl = x[:h]
            xh = x[h : 2 * h]
            for q in range(p, t):
                y = src[q]
                if w < 2:
                    tmp[0] = x[0] * y[0]
                    gram[p, q] += _tree_sum(tmp, w)
                    continue
                yl = y[:h]
                yh = y[h : 2 * h]
                for j in range(h):
                    tmp[j] = xl[j] * yl[j] + xh[j] * yh[j]
                if w % 2:
                    tmp[0] = tmp[0] + x[w - 1] * y[w - 1]
                gram[p, q] += _tree_sum(tmp, h)

    @njit(parallel=True, cache=True)
    def server_round_kernel(
        uploads,
        masks,
        mask_kind,
        holder_start,
        holder_upload,
        holder_mask,
        holder_rescale,
        holder_weight,
        totals,
        n,
        block,
        gram_mode,
        transfer,
        mix,
        group_start,
        group_rows,
        n_out,
        out_u,
        out_m,
        majority,
        tie,
        mean,
        use_masks,
        pack,
        gram,
        num,
        den,
        bad,
    ):
        """One pass of the fused server round over n columns.

        Per block: task averages (one read of every upload slice, in cache afterwards); optionally the Gram matrix of
        the averages (``gram_mode``: 0 none, 1 products, 2 signs); optionally transfer (``mix`` is the T x T weight
        matrix) and the unification of each download group (rows ``group_rows[group_start[g]:group_start[g+1]]``
        into ``out_u[g]`` and one mask per row, ``out_m[group_start[g] + i]``); skipped when ``n_out == 0`` (the
        similarity pass of a round with transfer).
        """
        n_tasks = holder_start.shape[0] - 1
        n_blocks = (n + block - 1) // block
        per = (n_blocks + N_GROUPS - 1) // N_GROUPS
        for g in prange(N_GROUPS):
            avg = np.empty((n_tasks, block), np.float32)
            shared = np.empty((n_tasks, block), np.float32)  # transfer's output, or the signs for the Gram matrix
            bits = np.empty(block + 8, np.uint8)
            tmp = np.empty(block, np.float32)
            total = np.empty(block, np.float32)
            mu = np.empty(block, np.float32)
            cnt = np.empty(block, np.float32)
            absum = np.empty(n_tasks, np.float64)  # per task: sum |row| over the block (rescaler numerators)
            for bi in range(g * per, min((g + 1) * per, n_blocks)):
                a = bi * block
                w = min(block, n - a)
                for t in range(n_tasks):
                    row = avg[t]
                    for h in range(holder_start[t], holder_start[t + 1]):
                        _accumulate(
                            row,
                            uploads[holder_upload[h]],
                            a,
                            w,
                            holder_rescale[h],
                            holder_weight[h],
                            mask_kind[h],
                            masks[holder_mask[h]],
                            h == holder_start[t],
                            bits,
                        )
                    absum[t] = _divide(row, w, totals[t], tmp)
                    if absum[t] - absum[t] != 0:
                        bad[g] = 1
                if gram_mode > 0:
                    _gram_block(avg, w, gram_mode == 2, gram[g], shared, tmp)
                if n_out == 0:
                    continue
                if transfer:
                    for t in range(n_tasks):
                        out = shared[t]
                        _fill(out, w, np.float32(0.0))
                        for b in range(n_tasks):
                            c = mix[t, b]
                            if c > 0:
                                src = avg[b]
                                for j in range(w):
                                    out[j] = out[j] + src[j] * c
                        absum[t] = _abs_sum(out, w, tmp)
                for o in range(n_out):
                    rows = group_rows[group_start[o] : group_start[o + 1]]
                    if not _unify_block(
                        shared if transfer else avg,
                        rows,
                        w,
                        majority,
                        tie,
                        mean,
                        use_masks,
                        pack,
                        out_u[o],
                        out_m,
                        a,
                        num[g],
                        den[g],
                        group_start[o],
                        total,
                        mu,
                        cnt,
                        bits,
                        tmp,
                        absum,
                    ):
                        bad[g] = 1


def typed_list(arrays: list[np.ndarray]):
    """A numba typed list of arrays (how a kernel takes a variable number of separately allocated vectors)."""
    out = TypedList()
    for x in arrays:
        out.append(x)
    return out


def threads() -> int:
    """Threads the kernels run on (numba's pool; ``NUMBA_NUM_THREADS`` sets it)."""
    return numba.get_num_threads() if AVAILABLE else 1


def match_torch_threads() -> None:
    """Run the kernels on as many threads as torch uses (``OMP_NUM_THREADS`` / ``torch.set_num_threads``), so
    a process asked to use one core uses one core; results do not depend on it (fixed block groups)."""
    import torch

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
