"""Fused attention in Triton (FlashAttention-2 style): forward, weights pass, backward.

Kernels and their launchers only; validation and dispatch live in ``mmattn/``
(:mod:`mmattn.backends.triton`). Semantics are those of the reference backend
(:mod:`mmattn.backends.reference`):

* ``q (B, Hq, Lq, D)``, ``k (B, Hkv, Lk, D)``, ``v (B, Hkv, Lk, Dv)``, ``Hq % Hkv == 0``,
  any strides (read in place, strides are kernel arguments); head dims up to 256,
  padded to a power of two >= 16 inside the kernels.
* masks, combined by AND: ``attn_mask`` bool (True = visible) or float (added to the
  scaled scores) read through its strides (broadcast dimensions have stride 0);
  ``key_padding_mask (B, Lk)`` bool (True = padding); top-left ``is_causal``; a
  BlockMask given as its compressed tensors. A row with no visible key gives 0 output,
  lse = +inf and 0 gradients.
* dropout: Philox (:func:`mmattn.kernels.philox.philox_uniform`) with the counters of
  :mod:`mmattn.philox`: element ``(b, h, i, j)`` uses ``n = i * Lk + j`` (int64),
  ``c0 = n mod 2**32``, ``c1 = b * Hq + h``, ``c2 = n >> 32``; kept iff ``u >= p``, kept
  values scaled by ``1 / (1 - p)``. The backward regenerates the mask.

Scores are computed as the reference does, ``s = (q . k) * scale (+ float mask)``, and
exponentiated in the natural base against the running maximum (forward) or the saved
lse (backward), so the kernels round like the reference (no ``log2(e)`` folded into
the scale: that saves one multiply per score but adds roundings at |s|).

Work split (no atomics, so every result is bitwise reproducible):

* forward / weights / dQ: one program per (query tile, batch * query head); it walks
  all kv tiles, or with a block mask the kv blocks listed in ``kv_indices`` (each cut
  into ``BLOCK_N`` tiles), skipping tiles above the diagonal when causal;
* dK/dV: one program per (kv tile, batch * kv head); it loops over the query heads of
  its GQA group and their query tiles (``q_indices`` with a block mask) and sums
  locally before one store;
* a preprocess computes ``delta = rowsum(dO * O) - grad_lse``.

With a block mask a query tile never straddles two query blocks (program ``t`` covers
rows ``[qb*bq + s*BLOCK_M, ...)`` of query block ``qb``) and a kv tile never straddles
two kv blocks, so full blocks need no element mask and partial ones read one stored
mask ``partial_masks[idx] (P, pq, pk)`` (positions past ``pq``/``pk`` hidden). With
power-of-two block sizes the tiles are the blocks, or equal slices of them.

Tile sizes come from :func:`candidate_configs` (sm_80 / sm_90 lists keyed on the
padded head dims, the block sizes, the dtype and whether the call is "heavy": a mask
tile, a block mask or dropout); ``triton.autotune`` picks among them on a GPU, the
interpreter (``TRITON_INTERPRET=1``) runs one fixed config. Dots take float16/bfloat16
operands with float32 accumulation; float32 operands use IEEE dots unless TF32 is
allowed (:func:`dot_precision`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .philox import philox_uniform

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# ---------------------------------------------------------------------------------------
# device functions
# ---------------------------------------------------------------------------------------


# float32 IEEE scores: the head dim is summed in chunks of this many dims (see _qk)
_QK_CHUNK = tl.constexpr(16)


@triton.jit
def _qk(q, k, PRECISION: tl.constexpr):
    """``q @ k^T`` of a (m, d) and an (n, d) tile, float32 accumulation.

    float32 IEEE dots over head dims above 64 (FMA chains on a GPU, a sequential BLAS
    loop under the interpreter) sum the head dim in chunks of 16 (one batched dot) and
    add the chunk sums by a tree reduction. One sequential sum of 128-256 products has
    1.3-2x the error of a CPU GEMM's (the reference), and a near tie of two scores turns
    score error into output and gradient error: at amplitudes 3-30 that failed DESIGN's
    rule in 2-3 of 10 random cases at d = 256 (chunked: 0.4-0.6x the sequential error,
    no failure in 40 such cases). Smaller head dims (and their larger float32 tiles,
    which the batched dot's registers would not fit), half inputs (tensor cores, exact
    products) and TF32 keep one dot.
    """
    if q.dtype == tl.float32 and PRECISION == "ieee" and q.shape[1] > 64:
        chunks: tl.constexpr = q.shape[1] // _QK_CHUNK
        qc = tl.permute(tl.reshape(q, (q.shape[0], chunks, _QK_CHUNK)), (1, 0, 2))
        kc = tl.permute(tl.reshape(k, (k.shape[0], chunks, _QK_CHUNK)), (1, 2, 0))
        return tl.sum(tl.dot(qc, kc, input_precision=PRECISION), 0)
    return tl.dot(q, tl.trans(k), input_precision=PRECISION)


@triton.jit
def _scores(q, k, rows, cols, row_hi, col_hi, scale, mask_ptr, stride_ml, stride_mk,
            kpm_ptr, stride_kpl, part_ptr, pidx, stride_p0, stride_p1, stride_p2,
            blk_r0, blk_c0, PQ, PK,
            MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr,
            HAS_BLOCKS: tl.constexpr, PRECISION: tl.constexpr):
    """Scaled, masked scores of one (BLOCK_M, BLOCK_N) tile: -inf where hidden.

    ``rows``/``cols`` are global positions, ``blk_r0``/``blk_c0`` the tile's offsets inside
    its block (block mask); ``mask_ptr`` points at the tile's first element of the
    (b, h) mask plane; ``kpm_ptr`` at the tile's first key of batch b.
    Each mask is applied to ``s`` as soon as it is read, so no boolean tile stays live
    (registers are what limits the tile sizes).
    """
    s = _qk(q, k, PRECISION) * scale
    row_ok = rows < row_hi
    col_ok = cols < col_hi
    local_r = tl.arange(0, q.shape[0])
    local_c = tl.arange(0, k.shape[0])
    if MASK_KIND == 1:
        m = tl.load(mask_ptr + local_r[:, None] * stride_ml + local_c[None, :] * stride_mk,
                    mask=row_ok[:, None] & col_ok[None, :], other=0)
        s = tl.where(m != 0, s, float("-inf"))
    if MASK_KIND == 2:
        m = tl.load(mask_ptr + local_r[:, None] * stride_ml + local_c[None, :] * stride_mk,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        s = s + m.to(tl.float32)
    if HAS_KPM:
        pad = tl.load(kpm_ptr + local_c * stride_kpl, mask=col_ok, other=1)
        col_ok = col_ok & (pad == 0)
    if IS_CAUSAL:
        s = tl.where(cols[None, :] <= rows[:, None], s, float("-inf"))
    if HAS_BLOCKS:
        # partial block (pidx >= 0): its stored element mask, read with its own shape
        # (PQ, PK); a predicated load rather than a branch keeps one code path. Offsets
        # inside the block are multiples of the tile sizes, so the loads vectorise.
        r = blk_r0 + local_r
        c = blk_c0 + local_c
        base = part_ptr + pidx.to(tl.int64) * stride_p0
        pm = tl.load(base + r[:, None] * stride_p1 + c[None, :] * stride_p2,
                     mask=((row_ok & (r < PQ))[:, None] & (col_ok & (c < PK))[None, :])
                     & (pidx >= 0), other=0)
        s = tl.where((pm != 0) | (pidx < 0), s, float("-inf"))
    return tl.where(row_ok[:, None] & col_ok[None, :], s, float("-inf"))


@triton.jit
def _dot_split(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b`` for a float32 tile ``a`` and a ``b`` of the input dtype.

    Half inputs: ``a`` enters the tensor cores as two half tiles, its rounding and the
    rounding's remainder, so it keeps ~22 bits instead of 11 (16 instead of 8 for
    bfloat16), for one more dot. Used for dS in dQ and dK: sums whose terms cancel
    (each row of dS sums to zero), where dS rounded to half gave several times the
    float32 reference's error."""
    if b.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=PRECISION)
    hi = a.to(b.dtype)
    lo = (a - hi.to(tl.float32)).to(b.dtype)
    acc = tl.dot(lo, b, acc, input_precision=PRECISION)
    return tl.dot(hi, b, acc, input_precision=PRECISION)


@triton.jit
def _philox_keep(rows, cols, Lk, bh, seed_lo, seed_hi, dropout_p):
    """Keep mask for the (rows x cols) elements under mmattn's dropout counters.

    ``n = i * Lk + j`` is formed in 32-bit words: per row ``i * Lk`` in int64 (a vector),
    per element the low word wraps and the carry goes into the high word, so no int64
    tile is held.
    """
    row_base = rows.to(tl.int64) * Lk
    row_lo = row_base.to(tl.int32).to(tl.uint32, bitcast=True)
    row_hi = (row_base >> 32).to(tl.int32)
    lo = row_lo[:, None] + cols.to(tl.uint32, bitcast=True)[None, :]
    carry = (lo < row_lo[:, None]).to(tl.int32)
    c0 = lo.to(tl.int32, bitcast=True)
    c2 = row_hi[:, None] + carry
    c1 = tl.zeros_like(c0) + bh
    return philox_uniform(seed_lo, seed_hi, c0, c1, c2) >= dropout_p


@triton.jit
def _dropout_keep(rows, col_lo, Lk, bh, seed_lo, seed_hi, dropout_p, BLOCK_N: tl.constexpr):
    """Keep mask of the tile with keys ``col_lo + arange(BLOCK_N)`` (see module docstring).

    Philox holds four words per element through ten rounds: on a whole tile that is
    most of the registers. The tile is generated in interleaved column slices (every
    2nd or 4th key) that are joined afterwards, so only a slice's state is live at once.
    """
    SPLIT: tl.constexpr = 4 if BLOCK_N >= 16 and rows.shape[0] * BLOCK_N >= 4096 else (
        2 if BLOCK_N >= 8 and rows.shape[0] * BLOCK_N >= 2048 else 1)
    if SPLIT == 1:
        keep = _philox_keep(rows, col_lo + tl.arange(0, BLOCK_N), Lk, bh, seed_lo, seed_hi,
                            dropout_p)
    elif SPLIT == 2:
        even = col_lo + 2 * tl.arange(0, BLOCK_N // 2)
        k0 = _philox_keep(rows, even, Lk, bh, seed_lo, seed_hi, dropout_p)
        k1 = _philox_keep(rows, even + 1, Lk, bh, seed_lo, seed_hi, dropout_p)
        # join: [.., j, s] is key 2j + s, so the row-major reshape restores key order
        keep = tl.reshape(tl.join(k0, k1), (rows.shape[0], BLOCK_N))
    else:
        base = col_lo + 4 * tl.arange(0, BLOCK_N // 4)
        k0 = _philox_keep(rows, base, Lk, bh, seed_lo, seed_hi, dropout_p)
        k2 = _philox_keep(rows, base + 2, Lk, bh, seed_lo, seed_hi, dropout_p)
        even = tl.join(k0, k2)  # [.., j, s]: key 4j + 2s
        k1 = _philox_keep(rows, base + 1, Lk, bh, seed_lo, seed_hi, dropout_p)
        k3 = _philox_keep(rows, base + 3, Lk, bh, seed_lo, seed_hi, dropout_p)
        odd = tl.join(k1, k3)  # key 4j + 2s + 1
        keep = tl.reshape(tl.join(even, odd), (rows.shape[0], BLOCK_N))  # 4j + 2s + u
    return keep


@triton.jit
def _query_rows(tile, Lq, BQ, BLOCK_M: tl.constexpr, HAS_BLOCKS: tl.constexpr):
    """(first row, end row, query block, offset of the first row in its block) of query
    tile ``tile``.

    Also used with the roles swapped for the kv tile of a dK/dV program."""
    if HAS_BLOCKS:
        per_block = tl.cdiv(BQ, BLOCK_M)
        qb = tile // per_block
        in_block = (tile % per_block) * BLOCK_M
        row_lo = qb * BQ + in_block
        row_hi = tl.minimum(tl.minimum(qb * BQ + BQ, Lq), row_lo + BLOCK_M)
    else:
        qb = 0
        in_block = 0
        row_lo = tile * BLOCK_M
        row_hi = tl.minimum(row_lo + BLOCK_M, Lq)
    return row_lo, row_hi, qb, in_block


# The walks below are flat: one loop over (kv block, sub-tile) pairs (or (head, query
# block, sub-tile) triples for dK/dV) instead of nested loops. With nested loops Triton
# kept the softmax state in two register layouts at once and spilled; one loop compiles
# like the dense kernel.


@triton.jit
def _kv_walk_len(KvNum, KvIdx, plane, qb, row_hi, Lk, NBQ, NBK, BK,
                 BLOCK_N: tl.constexpr, HAS_BLOCKS: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """Number of kv tiles a query tile visits."""
    if HAS_BLOCKS:
        num = tl.load(KvNum + plane * NBQ + qb)
        if IS_CAUSAL:  # kv_indices ascend: keep the blocks that start at or before row_hi-1
            listed = KvIdx + (plane * NBQ + qb).to(tl.int64) * NBK
            visit = num * 0
            for t in range(0, num):
                visit += (tl.load(listed + t) * BK < row_hi).to(tl.int32)
            num = visit
        n_iter = num * tl.cdiv(BK, BLOCK_N)
    else:
        col_end = Lk
        if IS_CAUSAL:  # keys past the tile's last row are hidden: their tiles are skipped
            col_end = tl.minimum(col_end, row_hi)
        n_iter = tl.cdiv(col_end, BLOCK_N)
    return n_iter


@triton.jit
def _kv_walk_step(it, KvIdx, PartIdx, plane, qb, row_hi, Lk, NBQ, NBK, BK,
                  BLOCK_N: tl.constexpr, HAS_BLOCKS: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """(first key, end key, offset of the first key in its block, partial-mask index or
    -1) of the ``it``-th kv tile of a query tile."""
    if HAS_BLOCKS:
        subs = tl.cdiv(BK, BLOCK_N)
        t = it // subs
        listed = (plane * NBQ + qb).to(tl.int64) * NBK
        kb = tl.load(KvIdx + listed + t)
        pidx = tl.load(PartIdx + listed + kb)
        in_block = (it - t * subs) * BLOCK_N
        col_lo = kb * BK + in_block
        col_hi = tl.minimum(kb * BK + BK, Lk)
    else:
        pidx = -1
        in_block = 0
        col_lo = it * BLOCK_N
        col_hi = Lk
    if IS_CAUSAL:
        col_hi = tl.minimum(col_hi, row_hi)
    return col_lo, col_hi, in_block, pidx


@triton.jit
def _q_walk_setup(QNum, QIdx, b, hk, G, kb, col_lo, Lq, BQ, NBQ, NBK, BM, HM,
                  BLOCK_M: tl.constexpr, G_P2: tl.constexpr, HAS_BLOCKS: tl.constexpr,
                  IS_CAUSAL: tl.constexpr):
    """The query tiles a dK/dV program visits, over the heads of its GQA group:
    ``(total, ends, counts, starts)``. Dense: ``counts`` holds the per-head count (same for
    every head) and ``starts`` the first row. Block mask: per head ``hh`` (vector lane)
    ``counts`` tiles from its ``starts``-th listed query block on, ``ends`` their prefix
    sums."""
    lanes = tl.arange(0, G_P2)
    if HAS_BLOCKS:
        subs = tl.cdiv(BQ, BLOCK_M)
        counts = tl.zeros([G_P2], tl.int32)
        starts = tl.zeros([G_P2], tl.int32)
        for hh in range(0, G):
            plane = (b % BM) * HM + ((hk * G + hh) % HM)
            num = tl.load(QNum + plane * NBK + kb)
            first = num * 0
            if IS_CAUSAL:  # q_indices ascend: skip blocks whose rows all lie above col_lo
                listed = QIdx + (plane * NBK + kb).to(tl.int64) * NBQ
                for t in range(0, num):
                    first += ((tl.load(listed + t) + 1) * BQ <= col_lo).to(tl.int32)
            counts = tl.where(lanes == hh, (num - first) * subs, counts)
            starts = tl.where(lanes == hh, first, starts)
        ends = tl.cumsum(counts, 0)
        total = tl.sum(counts, 0)
    else:
        row_start = 0
        if IS_CAUSAL:  # rows above the tile's first key see none of its keys
            row_start = col_lo
        per_head = tl.cdiv(tl.maximum(Lq - row_start, 0), BLOCK_M)
        counts = tl.zeros([G_P2], tl.int32) + per_head
        starts = tl.zeros([G_P2], tl.int32) + row_start
        ends = counts
        total = per_head * G
    return total, ends, counts, starts


@triton.jit
def _q_walk_step(it, ends, counts, starts, QIdx, PartIdx, b, hk, G, kb, Lq, BQ, NBQ, NBK,
                 BM, HM, BLOCK_M: tl.constexpr, G_P2: tl.constexpr, HAS_BLOCKS: tl.constexpr):
    """(query head, first row, end row, offset of the first row in its block,
    partial-mask index or -1) of the ``it``-th query tile of a dK/dV program."""
    if HAS_BLOCKS:
        lanes = tl.arange(0, G_P2)
        hh = tl.sum((ends <= it).to(tl.int32), 0)
        this = lanes == hh
        local = it - tl.sum(tl.where(this, ends - counts, 0), 0)
        subs = tl.cdiv(BQ, BLOCK_M)
        t = tl.sum(tl.where(this, starts, 0), 0) + local // subs
        h = hk * G + hh
        plane = (b % BM) * HM + (h % HM)
        qb = tl.load(QIdx + (plane * NBK + kb).to(tl.int64) * NBQ + t)
        pidx = tl.load(PartIdx + (plane * NBQ + qb).to(tl.int64) * NBK + kb)
        in_block = (local % subs) * BLOCK_M
        row_lo = qb * BQ + in_block
        row_hi = tl.minimum(qb * BQ + BQ, Lq)
    else:
        per_head = tl.max(counts, 0)
        hh = it // per_head
        h = hk * G + hh
        row_lo = tl.max(starts, 0) + (it - hh * per_head) * BLOCK_M
        row_hi = Lq
        in_block = 0
        pidx = -1
    return h, row_lo, row_hi, in_block, pidx


# ---------------------------------------------------------------------------------------
# forward (and the weights pass, which shares its walk over kv tiles)
# ---------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "dropout_p", "drop_scale", "scale"])
def _attn_fwd_kernel(
    Q, K, V, Out, OutF32, Lse, LseLo, Weights, Mask, Kpm, KvNum, KvIdx, PartIdx, PartMasks,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_mb, stride_mh, stride_ml, stride_mk,
    stride_kpb, stride_kpl,
    stride_p0, stride_p1, stride_p2,
    Hq, G, Lq, Lk, D, Dv, BQ, BK, PQ, PK, NBQ, NBK, BM, HM,
    scale, dropout_p, drop_scale, seed_lo, seed_hi,
    MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_BLOCKS: tl.constexpr, HAS_DROPOUT: tl.constexpr, KEEP_F32: tl.constexpr,
    WEIGHTS_PASS: tl.constexpr, SAVE_LSE_LO: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Forward (``WEIGHTS_PASS`` False): out, lse (and out in float32; with
    ``SAVE_LSE_LO`` also ``LseLo``, the rounding error of the float32 lse). Weights pass:
    the normalised post-dropout probabilities ``exp((s - lse) - lse_lo) * keep / (1 - p)``
    of the visited tiles, from the saved lse and lse_lo (the rest of ``Weights`` is zero
    already).

    Why lse_lo: at scores of ~1000 one float32 ulp of lse is 6e-5, and ``exp(s - lse)``
    would carry that whole rounding error into every probability of the row (the
    reference's softmax is exact to ~1e-7). ``s - lse`` is exact for the scores near the
    maximum (Sterbenz), so subtracting the small ``lse_lo`` afterwards restores the
    normalisation to float32 accuracy."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // G
    row_lo, row_hi, qb, row_in_blk = _query_rows(tile, Lq, BQ, BLOCK_M, HAS_BLOCKS)
    if row_lo >= row_hi:  # a block-mask grid slot past its block's rows
        return
    rows = row_lo + tl.arange(0, BLOCK_M)
    row_ok = rows < row_hi
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)

    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + rows.to(tl.int64)[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    mask_base = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh \
        + tl.cast(row_lo, tl.int64) * stride_ml
    kpm_base = Kpm + b.to(tl.int64) * stride_kpb

    if WEIGHTS_PASS:
        lse = tl.load(Lse + bh.to(tl.int64) * Lq + rows, mask=row_ok, other=float("inf"))
        lse_lo = tl.load(LseLo + bh.to(tl.int64) * Lq + rows, mask=row_ok, other=0.0)
        w_base = Weights + bh.to(tl.int64) * Lq * Lk + tl.cast(row_lo, tl.int64) * Lk
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    plane = (b % BM) * HM + (h % HM)
    n_iter = _kv_walk_len(KvNum, KvIdx, plane, qb, row_hi, Lk, NBQ, NBK, BK,
                          BLOCK_N, HAS_BLOCKS, IS_CAUSAL)
    for it in range(0, n_iter):
        col_lo, col_hi, col_in_blk, pidx = _kv_walk_step(
            it, KvIdx, PartIdx, plane, qb, row_hi, Lk, NBQ, NBK, BK,
            BLOCK_N, HAS_BLOCKS, IS_CAUSAL)
        cols = col_lo + offs_n
        col_ok = cols < col_hi
        k = tl.load(k_base + cols.to(tl.int64)[:, None] * stride_kl
                    + offs_d[None, :] * stride_kd,
                    mask=col_ok[:, None] & (offs_d < D)[None, :], other=0.0)
        s = _scores(q, k, rows, cols, row_hi, col_hi, scale,
                    mask_base + tl.cast(col_lo, tl.int64) * stride_mk, stride_ml, stride_mk,
                    kpm_base + tl.cast(col_lo, tl.int64) * stride_kpl, stride_kpl,
                    PartMasks, pidx, stride_p0, stride_p1, stride_p2, row_in_blk, col_in_blk,
                    PQ, PK, MASK_KIND, HAS_KPM, IS_CAUSAL, HAS_BLOCKS, PRECISION)
        if WEIGHTS_PASS:
            p = tl.exp((s - lse[:, None]) - lse_lo[:, None])
            if HAS_DROPOUT:
                keep = _dropout_keep(rows, col_lo, Lk, bh, seed_lo, seed_hi, dropout_p, BLOCK_N)
                p = tl.where(keep, p * drop_scale, 0.0)
            tl.store(w_base + tl.arange(0, BLOCK_M)[:, None] * Lk + cols[None, :],
                     p.to(Weights.dtype.element_ty),
                     mask=row_ok[:, None] & col_ok[None, :])
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row that has seen no visible key yet keeps m = -inf: subtract 0 instead
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_use)
            p = tl.exp(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if HAS_DROPOUT:
                keep = _dropout_keep(rows, col_lo, Lk, bh, seed_lo, seed_hi, dropout_p, BLOCK_N)
                p = tl.where(keep, p * drop_scale, 0.0)
            v = tl.load(v_base + cols.to(tl.int64)[:, None] * stride_vl
                        + offs_dv[None, :] * stride_vd,
                        mask=col_ok[:, None] & (offs_dv < Dv)[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

    if not WEIGHTS_PASS:
        has_key = l_i > 0.0
        l_safe = tl.where(has_key, l_i, 1.0)
        out = acc / l_safe[:, None]
        m_fin = tl.where(has_key, m_i, 0.0)
        log_l = tl.log(l_safe)
        lse_row = m_fin + log_l
        tl.store(Lse + bh.to(tl.int64) * Lq + rows, tl.where(has_key, lse_row, float("inf")),
                 mask=row_ok)
        if SAVE_LSE_LO:
            # TwoSum: lse_row + lse_lo == m + log(l) exactly (additions only, which the
            # compiler does not reassociate)
            part = lse_row - m_fin
            lse_lo = (m_fin - (lse_row - part)) + (log_l - part)
            tl.store(LseLo + bh.to(tl.int64) * Lq + rows, tl.where(has_key, lse_lo, 0.0),
                     mask=row_ok)
        o_offs = (bh.to(tl.int64) * Lq + rows.to(tl.int64))[:, None] * Dv + offs_dv[None, :]
        o_mask = row_ok[:, None] & (offs_dv < Dv)[None, :]
        tl.store(Out + o_offs, out.to(Out.dtype.element_ty), mask=o_mask)
        if KEEP_F32:
            tl.store(OutF32 + o_offs, out, mask=o_mask)


# ---------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out, DO, GradLse, Delta,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_db, stride_dh, stride_dl, stride_dd,
    Hq, Lq, Dv,
    HAS_GRAD_LSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """``delta = rowsum(dO * O) - grad_lse`` in float32, (B * Hq, Lq)."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    offs = tl.arange(0, BLOCK_DV)
    m = row_ok[:, None] & (offs < Dv)[None, :]
    o = tl.load(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + rows.to(tl.int64)[:, None] * stride_ol + offs[None, :] * stride_od,
                mask=m, other=0.0).to(tl.float32)
    do = tl.load(DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
                 + rows.to(tl.int64)[:, None] * stride_dl + offs[None, :] * stride_dd,
                 mask=m, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_GRAD_LSE:
        delta -= tl.load(GradLse + bh.to(tl.int64) * Lq + rows, mask=row_ok, other=0.0)
    tl.store(Delta + bh.to(tl.int64) * Lq + rows, delta, mask=row_ok)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "dropout_p", "drop_scale", "scale"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Lam, Delta, DK, DV, Mask, Kpm, QNum, QIdx, PartIdx, PartMasks,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_mb, stride_mh, stride_ml, stride_mk,
    stride_kpb, stride_kpl,
    stride_p0, stride_p1, stride_p2,
    Hq, G, Lq, Lk, D, Dv, BQ, BK, PQ, PK, NBQ, NBK, BM, HM,
    scale, dropout_p, drop_scale, seed_lo, seed_hi,
    MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_BLOCKS: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, G_P2: tl.constexpr,
):
    """dK, dV of one kv tile of one (batch, kv head), summed over the GQA group's heads.

    ``dV = sum (P*Z)^T dO``, ``dK = scale * sum dS^T Q`` with ``dS = P * (dP*Z - delta)``,
    ``dP = dO V^T``; P recomputed from the saved lse and the dQ kernel's correction
    ``lam`` (see :func:`_attn_bwd_dq_kernel`), which also rewrote ``delta`` of the rows
    it corrected: this kernel runs after it. One loop visits the query tiles of every
    head of the group (``_q_walk_*``), so the sums stay in registers.
    """
    tile = tl.program_id(0)
    bhk = tl.program_id(1)
    Hkv = Hq // G
    b = bhk // Hkv
    hk = bhk % Hkv
    # the kv tile: like a query tile in the forward, with the roles of q and k swapped
    col_lo, col_hi, kb, col_in_blk = _query_rows(tile, Lk, BK, BLOCK_N, HAS_BLOCKS)
    if col_lo >= col_hi:
        return
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    cols = col_lo + tl.arange(0, BLOCK_N)
    col_ok = cols < col_hi
    k = tl.load(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
                + cols.to(tl.int64)[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                mask=col_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
                + cols.to(tl.int64)[:, None] * stride_vl + offs_dv[None, :] * stride_vd,
                mask=col_ok[:, None] & (offs_dv < Dv)[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    kpm_ptr = Kpm + b.to(tl.int64) * stride_kpb + tl.cast(col_lo, tl.int64) * stride_kpl

    total, ends, counts, starts = _q_walk_setup(QNum, QIdx, b, hk, G, kb, col_lo, Lq, BQ,
                                                NBQ, NBK, BM, HM, BLOCK_M, G_P2, HAS_BLOCKS,
                                                IS_CAUSAL)
    for it in range(0, total):
        h, row_lo, row_hi, row_in_blk, pidx = _q_walk_step(
            it, ends, counts, starts, QIdx, PartIdx, b, hk, G, kb, Lq, BQ, NBQ, NBK, BM, HM,
            BLOCK_M, G_P2, HAS_BLOCKS)
        bh = b * Hq + h
        rows = row_lo + offs_m
        row_ok = rows < row_hi
        q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                    + rows.to(tl.int64)[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
        do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                     + rows.to(tl.int64)[:, None] * stride_dol + offs_dv[None, :] * stride_dod,
                     mask=row_ok[:, None] & (offs_dv < Dv)[None, :], other=0.0)
        lse = tl.load(Lse + bh.to(tl.int64) * Lq + rows, mask=row_ok, other=float("inf"))
        lam = tl.load(Lam + bh.to(tl.int64) * Lq + rows, mask=row_ok, other=0.0)
        delta = tl.load(Delta + bh.to(tl.int64) * Lq + rows, mask=row_ok, other=0.0)
        mask_ptr = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh \
            + tl.cast(row_lo, tl.int64) * stride_ml + tl.cast(col_lo, tl.int64) * stride_mk
        s = _scores(q, k, rows, cols, row_hi, col_hi, scale, mask_ptr, stride_ml, stride_mk,
                    kpm_ptr, stride_kpl, PartMasks, pidx, stride_p0, stride_p1, stride_p2,
                    row_in_blk, col_in_blk, PQ, PK, MASK_KIND, HAS_KPM, IS_CAUSAL, HAS_BLOCKS,
                    PRECISION)
        p = tl.exp((s - lse[:, None]) - lam[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(rows, col_lo, Lk, bh, seed_lo, seed_hi, dropout_p, BLOCK_N)
            p_dropped = tl.where(keep, p * drop_scale, 0.0)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        else:
            p_dropped = p
        dv += tl.dot(tl.trans(p_dropped.to(do.dtype)), do, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk = _dot_split(tl.trans(ds), q, dk, PRECISION)

    dk = dk * scale
    out_row = (bhk.to(tl.int64) * Lk + cols.to(tl.int64))[:, None]
    tl.store(DK + out_row * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=col_ok[:, None] & (offs_d < D)[None, :])
    tl.store(DV + out_row * Dv + offs_dv[None, :], dv.to(DV.dtype.element_ty),
             mask=col_ok[:, None] & (offs_dv < Dv)[None, :])


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "dropout_p", "drop_scale", "scale"])
def _attn_bwd_dq_kernel(
    Q, K, V, DO, Lse, Lam, Delta, GradLse, DQ, Mask, Kpm, KvNum, KvIdx, PartIdx, PartMasks,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_mb, stride_mh, stride_ml, stride_mk,
    stride_kpb, stride_kpl,
    stride_p0, stride_p1, stride_p2,
    Hq, G, Lq, Lk, D, Dv, BQ, BK, PQ, PK, NBQ, NBK, BM, HM,
    scale, dropout_p, drop_scale, seed_lo, seed_hi,
    MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_BLOCKS: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_GRAD_LSE: tl.constexpr,
    STATS_PASS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``dQ = scale * sum_j dS K`` of one query tile, walking kv tiles as the forward
    (``P = exp((s - lse) - lam)``).

    Stats pass (``STATS_PASS``, launched first): two row corrections that this kernel's
    dQ pass and the dK/dV kernel read, from a walk over the row's kv tiles that computes
    the scores and ``dP`` exactly as the dQ and dK/dV walks do:

    * ``lam = log(sum_j exp(s_j - lse))``: the float32 lse is off by up to half an ulp
      (3e-5 at scores of 1000) and ``exp(s - lse)`` would carry that into every P of
      the row; ``P = exp((s - lse) - lam)`` sums to 1 over the recomputed scores
      (``s - lse`` is exact near the row maximum, so the small lam is not lost).
    * ``delta = sum_j P_j Z_j dP_j - grad_lse`` from those same dP values instead of
      the preprocess's ``rowsum(dO * O)``: in a peaked row ``dS = P (dP Z - delta)`` is a
      small difference of large terms whose rounding cancels only when delta is made of
      the dP it is subtracted from (as the reference's softmax backward does; a row
      with one visible key then gets dS = 0 exactly).

    Every row gets both: a peaked row (the second need) may have a small |lse| (scores
    near 0 over very negative ones, a causal row with few keys), which no test on lse
    finds before the walk. Rows with no visible key keep ``lam = 0`` (the launcher's
    zeros) and their delta.
    """
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // G
    row_lo, row_hi, qb, row_in_blk = _query_rows(tile, Lq, BQ, BLOCK_M, HAS_BLOCKS)
    if row_lo >= row_hi:
        return
    rows = row_lo + tl.arange(0, BLOCK_M)
    row_ok = rows < row_hi
    row_offs = bh.to(tl.int64) * Lq + rows
    lse = tl.load(Lse + row_offs, mask=row_ok, other=float("inf"))
    # The stats pass sums in float64: delta = t / c rounds once. In a peaked row dP at the
    # dominant key and delta agree to a few digits and dS is their difference; float32
    # sums (each product and addition rounded at |dP|'s ulp) gave dK 2.5x the reference's
    # error. Errors in p itself cancel in t / c.
    c = tl.zeros([BLOCK_M], tl.float64)  # stats: sum_j exp(s_j - lse)
    if STATS_PASS:
        n_visible = tl.sum((row_ok & (lse < float("inf"))).to(tl.int32), 0)
        lam = tl.zeros([BLOCK_M], tl.float32)
    else:
        n_visible = 1
        lam = tl.load(Lam + row_offs, mask=row_ok, other=0.0)
    if n_visible > 0:  # (stats pass: tiles whose rows see no key have nothing to correct)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        offs_n = tl.arange(0, BLOCK_N)
        q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                    + rows.to(tl.int64)[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
        do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                     + rows.to(tl.int64)[:, None] * stride_dol + offs_dv[None, :] * stride_dod,
                     mask=row_ok[:, None] & (offs_dv < Dv)[None, :], other=0.0)
        delta = tl.load(Delta + row_offs, mask=row_ok, other=0.0)
        k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
        mask_base = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh \
            + tl.cast(row_lo, tl.int64) * stride_ml
        kpm_base = Kpm + b.to(tl.int64) * stride_kpb
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        t = tl.zeros([BLOCK_M], tl.float64)  # stats: sum_j exp(s_j - lse) Z_j dP_j

        plane = (b % BM) * HM + (h % HM)
        n_iter = _kv_walk_len(KvNum, KvIdx, plane, qb, row_hi, Lk, NBQ, NBK, BK,
                              BLOCK_N, HAS_BLOCKS, IS_CAUSAL)
        for it in range(0, n_iter):
            col_lo, col_hi, col_in_blk, pidx = _kv_walk_step(
                it, KvIdx, PartIdx, plane, qb, row_hi, Lk, NBQ, NBK, BK,
                BLOCK_N, HAS_BLOCKS, IS_CAUSAL)
            cols = col_lo + offs_n
            col_ok = cols < col_hi
            k = tl.load(k_base + cols.to(tl.int64)[:, None] * stride_kl
                        + offs_d[None, :] * stride_kd,
                        mask=col_ok[:, None] & (offs_d < D)[None, :], other=0.0)
            v = tl.load(v_base + cols.to(tl.int64)[:, None] * stride_vl
                        + offs_dv[None, :] * stride_vd,
                        mask=col_ok[:, None] & (offs_dv < Dv)[None, :], other=0.0)
            s = _scores(q, k, rows, cols, row_hi, col_hi, scale,
                        mask_base + tl.cast(col_lo, tl.int64) * stride_mk, stride_ml,
                        stride_mk, kpm_base + tl.cast(col_lo, tl.int64) * stride_kpl,
                        stride_kpl, PartMasks, pidx, stride_p0, stride_p1, stride_p2,
                        row_in_blk, col_in_blk, PQ, PK, MASK_KIND, HAS_KPM, IS_CAUSAL,
                        HAS_BLOCKS, PRECISION)
            p = tl.exp((s - lse[:, None]) - lam[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            if HAS_DROPOUT:
                keep = _dropout_keep(rows, col_lo, Lk, bh, seed_lo, seed_hi, dropout_p,
                                     BLOCK_N)
                dp = tl.where(keep, dp * drop_scale, 0.0)
            if STATS_PASS:
                p64 = p.to(tl.float64)
                c += tl.sum(p64, 1)
                t += tl.sum(p64 * dp.to(tl.float64), 1)
            else:
                ds = p * (dp - delta[:, None])
                dq = _dot_split(ds, k, dq, PRECISION)

        if STATS_PASS:
            # c > 0 exactly for the rows in range with a visible key (the others have
            # lse = +inf, so p = 0); only those are written: lam starts at zeros, and
            # no row mask stays live across the loop (ptxas spilled it to the stack)
            fixed = c > 0.0
            c_safe = tl.where(fixed, c, 1.0)
            new_delta = t / c_safe
            if HAS_GRAD_LSE:
                new_delta -= tl.load(GradLse + row_offs, mask=fixed, other=0.0).to(tl.float64)
            tl.store(Delta + row_offs, new_delta.to(tl.float32), mask=fixed)
            tl.store(Lam + row_offs, tl.log(c_safe.to(tl.float32)), mask=fixed)
        else:
            dq = dq * scale
            tl.store(DQ + row_offs[:, None] * D + offs_d[None, :],
                     dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d < D)[None, :])


# ---------------------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------------------

KERNEL_NAMES = ("fwd", "weights", "bwd_preprocess", "bwd_stats", "bwd_dkdv", "bwd_dq")

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, call class, arch and padded head
# dim (the larger of D and Dv, bucketed to 64 / 128 / 256). BLOCK_N is the kv tile; for
# bwd_dkdv BLOCK_N is the program's kv tile and BLOCK_M the query tile it iterates.
# "heavy" calls read a mask tile, a block mask or generate dropout (registers: Philox
# holds four words per element); "light" calls have at most key padding and causal
# masking. Every entry was chosen from ahead-of-time compiles for sm_80 and sm_90 with
# triton 3.6 and 3.8 (no spills, shared memory in bounds, tensor cores for half inputs;
# the two versions allocate registers differently, so some tiles that fit one spilled
# in the other and were dropped):
# scripts/triton_aot_check.py checks them and benchmarks/results/triton_aot.md lists them.
_HALF = {
    "fwd": {
        "light": {80: {64: [(128, 64, 4, 3), (128, 64, 8, 2), (64, 64, 4, 2)],
                       128: [(64, 64, 4, 2), (128, 32, 8, 2)],
                       256: [(64, 32, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2)]},
                  90: {64: [(128, 64, 8, 2), (64, 64, 4, 2)],
                       128: [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2)],
                       256: [(64, 32, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2)]}},
        "heavy": {80: {64: [(128, 32, 8, 2), (64, 64, 8, 2)],
                       128: [(64, 64, 8, 2), (128, 32, 8, 2)],
                       256: [(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2)]},
                  90: {64: [(128, 32, 8, 2), (64, 64, 8, 2)],
                       128: [(64, 64, 8, 2), (128, 32, 8, 2)],
                       256: [(32, 64, 8, 2), (32, 32, 4, 2)]}},
    },
    "weights": {
        "light": {80: {64: [(64, 64, 4, 2), (128, 64, 8, 2)],
                       128: [(64, 32, 4, 2)], 256: [(64, 32, 4, 2)]},
                  90: {64: [(64, 64, 4, 2), (128, 64, 8, 2)],
                       128: [(64, 64, 4, 2), (64, 32, 4, 2)], 256: [(64, 32, 4, 2)]}},
        "heavy": {80: {64: [(64, 64, 8, 2), (64, 32, 4, 2)], 128: [(64, 32, 4, 2)],
                       256: [(64, 32, 4, 2)]},
                  90: {64: [(64, 64, 8, 2), (64, 32, 4, 2)], 128: [(64, 32, 4, 2)],
                       256: [(64, 32, 4, 2)]}},
    },
    "bwd_dkdv": {
        "light": {80: {64: [(32, 64, 4, 2)],
                       128: [(32, 64, 8, 2), (16, 64, 4, 2)],
                       256: [(32, 32, 4, 1), (16, 32, 4, 1)]},
                  90: {64: [(32, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2)],
                       128: [(32, 64, 8, 2), (16, 64, 4, 2)],
                       256: [(32, 32, 4, 1), (16, 32, 4, 1)]}},
        "heavy": {80: {64: [(32, 32, 4, 2)], 128: [(16, 64, 8, 2), (16, 32, 4, 2)],
                       256: [(16, 16, 4, 1)]},
                  90: {64: [(32, 64, 8, 2), (16, 64, 4, 2), (32, 32, 4, 2)],
                       128: [(32, 64, 8, 2), (16, 64, 8, 2), (16, 32, 4, 2)],
                       256: [(16, 16, 4, 1)]}},
    },
    "bwd_dq": {
        "light": {80: {64: [(128, 64, 8, 2), (64, 64, 4, 2)],
                       128: [(64, 32, 4, 2)], 256: [(32, 32, 4, 1)]},
                  90: {64: [(128, 64, 8, 2), (64, 64, 4, 2)],
                       128: [(128, 64, 8, 2), (64, 32, 4, 2)], 256: [(32, 32, 4, 1)]}},
        "heavy": {80: {64: [(32, 64, 4, 2)], 128: [(64, 32, 8, 2), (32, 32, 4, 2)],
                       256: [(16, 32, 4, 1)]},
                  90: {64: [(128, 32, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2)],
                       128: [(64, 32, 8, 2), (32, 32, 4, 2)],
                       256: [(16, 32, 4, 1)]}},
    },
    # the dQ kernel's stats pass (no accumulator, yet at BLOCK_M 32 and head dims of 256
    # it spilled where the dQ pass did not)
    "bwd_stats": {
        "light": {80: {64: [(128, 64, 8, 2), (64, 64, 4, 2)],
                       128: [(64, 64, 4, 2), (64, 32, 4, 2)], 256: [(16, 32, 4, 1)]},
                  90: {64: [(128, 64, 8, 2), (64, 64, 4, 2)],
                       128: [(128, 64, 8, 2), (64, 32, 4, 2)], 256: [(16, 32, 4, 1)]}},
        "heavy": {80: {64: [(32, 64, 4, 2)], 128: [(64, 32, 8, 2), (32, 32, 4, 2)],
                       256: [(16, 32, 4, 1)]},
                  90: {64: [(128, 32, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2)],
                       128: [(64, 32, 8, 2), (32, 32, 8, 2)],
                       256: [(16, 32, 4, 1)]}},
    },
}
# float32: FMA dots (input_precision="ieee") unless TF32 is allowed: small tiles, and
# 8 warps where the operands' K slices would not fit 4 warps' registers.
_FP32 = {
    "fwd": {"light": {64: [(32, 32, 4, 2), (64, 16, 4, 2)], 128: [(32, 16, 4, 1)],
                      256: [(16, 16, 4, 1)]},
            "heavy": {64: [(32, 32, 4, 2), (64, 16, 4, 2)],
                      128: [(16, 32, 8, 1), (32, 16, 8, 1)], 256: [(16, 16, 8, 1)]}},
    "weights": {"light": {64: [(32, 32, 4, 2)], 128: [(32, 16, 4, 1)], 256: [(16, 16, 4, 1)]},
                "heavy": {64: [(32, 32, 4, 2)], 128: [(32, 16, 4, 1)], 256: [(16, 16, 4, 1)]}},
    "bwd_dkdv": {"light": {64: [(16, 32, 8, 2)], 128: [(16, 16, 4, 1)], 256: [(16, 16, 4, 1)]},
                 "heavy": {64: [(16, 32, 8, 2)], 128: [(16, 16, 4, 1)],
                           256: [(16, 16, 4, 1)]}},
    "bwd_dq": {"light": {64: [(32, 16, 4, 2), (16, 32, 4, 2)],
                         128: [(16, 16, 4, 1)], 256: [(16, 16, 4, 1)]},
               "heavy": {64: [(32, 16, 4, 2)],
                         128: [(16, 16, 4, 1), (32, 16, 4, 1)], 256: [(16, 16, 8, 1)]}},
    "bwd_stats": {"light": {64: [(32, 16, 4, 2), (16, 32, 4, 2)],
                            128: [(16, 16, 4, 1)], 256: [(16, 16, 8, 1)]},
                  "heavy": {64: [(16, 32, 4, 2)],
                            128: [(16, 16, 4, 1)], 256: [(16, 16, 8, 1)]}},
}
_PREPROCESS = [(64, 4), (128, 8)]  # (BLOCK_M, num_warps)
# One config under TRITON_INTERPRET=1 (no autotuning there). The interpreter runs each
# program in Python, so larger tiles run the tests faster; the tests' lengths (97, 130,
# 300, 1000) and block sizes still span several tiles.
_INTERPRET_TILE = (64, 64)


def head_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else (128 if block_d <= 128 else 256)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(max(int(n), 1)))


# (num_warps, num_stages, maxnreg) of a half-precision tile cut to a BlockMask's small
# blocks, per kernel, from AOT compiles. Small tiles need few warps and no buffering,
# but for dK/dV and dQ ptxas then aimed at more resident blocks (e.g. 168 registers
# for 128 threads) and spilled a few bytes to get there: maxnreg = 255 lifts that aim.
# (Set on every heavy tile, maxnreg made other tiles spill: ptxas then unrolls more.)
_CUT_TILE = {"fwd": (4, 1, 0), "weights": (4, 1, 0), "bwd_dkdv": (4, 1, 255),
             "bwd_dq": (8, 1, 255), "bwd_stats": (8, 2, 255)}


def _fit_to_blocks(kernel: str, tile: tuple[int, int, int, int], bq: int, bk: int,
                   dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """A dense config cut down to the BlockMask's block sizes (0 = dense), as
    ``(BLOCK_M, BLOCK_N, num_warps, num_stages, maxnreg)``: a tile never exceeds the
    (power-of-two padded) block. A cut half-precision tile takes :data:`_CUT_TILE`'s
    launch settings; float32 tiles keep theirs (their lists are small tiles already)."""
    bm, bn, warps, stages = tile
    cut_m = min(bm, _pow2(bq)) if bq else bm
    cut_n = min(bn, _pow2(bk)) if bk else bn
    maxnreg = 0
    if (cut_m, cut_n) != (bm, bn) and dtype != torch.float32:
        warps, stages, maxnreg = _CUT_TILE[kernel]
    return cut_m, cut_n, warps, stages, maxnreg


def is_heavy(mask_kind: int, has_dropout: bool, has_blocks: bool) -> bool:
    """Whether a call uses the "heavy" config lists (a mask tile, a block mask or
    dropout: more registers per element)."""
    return bool(mask_kind) or bool(has_dropout) or bool(has_blocks)


def candidate_configs(kernel: str, dtype: torch.dtype, block_d: int, block_dv: int,
                      bq: int = 0, bk: int = 0, arch: int = 90,
                      heavy: bool = False) -> list[tuple[int, int, int, int, int]]:
    """The autotuning candidates ``(BLOCK_M, BLOCK_N, num_warps, num_stages, maxnreg)``
    of an attention kernel (``maxnreg`` 0: ptxas chooses; "bwd_preprocess" has
    ``BLOCK_N`` 0); ``bq``/``bk`` are the BlockMask's block sizes (0: dense); ``arch`` 80
    or 90 (newer GPUs use the sm_90 lists); ``heavy`` see :func:`is_heavy`."""
    if kernel == "bwd_preprocess":
        return [(m, 0, w, 1, 0) for m, w in _PREPROCESS]
    bucket = head_bucket(max(block_d, block_dv))
    kind = "heavy" if heavy else "light"
    if dtype == torch.float32:
        tiles = _FP32[kernel][kind][bucket]
    else:
        tiles = _HALF[kernel][kind][90 if arch >= 90 else 80][bucket]
    fitted: list[tuple[int, int, int, int, int]] = []
    for tile in tiles:
        cut = _fit_to_blocks(kernel, tile, bq, bk, dtype)
        if cut not in fitted:
            fitted.append(cut)
    return fitted


def _all_configs(kernel: str) -> list[triton.Config]:
    """Every config any call may use: the union of the candidate lists (each call prunes
    it to its own list, see :func:`_prune`)."""
    seen: set[tuple[int, ...]] = set()
    sizes = [0, 16, 32, 64, 128, 256]
    for dtype in (torch.float16, torch.float32):
        for arch in (80, 90):
            for d in (64, 128, 256):
                for bq in sizes:
                    for bk in sizes:
                        for heavy in (False, True):
                            seen.update(candidate_configs(kernel, dtype, d, d, bq, bk, arch,
                                                          heavy))
    configs = []
    for bm, bn, warps, stages, maxnreg in sorted(seen):
        meta = {"BLOCK_M": bm} if kernel == "bwd_preprocess" else {"BLOCK_M": bm, "BLOCK_N": bn}
        configs.append(triton.Config(meta, num_warps=warps, num_stages=stages,
                                     maxnreg=maxnreg or None))
    return configs


def _device_arch() -> int:
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def _prune(kernel: str):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        dtype = args["Q"].dtype if "Q" in args else args["Out"].dtype
        blocks = args.get("HAS_BLOCKS", False)
        wanted = candidate_configs(
            kernel, dtype, args.get("BLOCK_D", 16), args["BLOCK_DV"],
            args.get("BQ", 0) if blocks else 0, args.get("BK", 0) if blocks else 0,
            _device_arch(), is_heavy(args.get("MASK_KIND", 0), args.get("HAS_DROPOUT", False),
                                     blocks))
        keep = []
        for config in configs:
            key = (config.kwargs["BLOCK_M"], config.kwargs.get("BLOCK_N", 0),
                   config.num_warps, config.num_stages, config.maxnreg or 0)
            if key in wanted:
                keep.append(config)
        return keep
    return prune


_KEYS = ["BLOCK_D", "BLOCK_DV", "BQ", "BK", "HAS_BLOCKS", "IS_CAUSAL", "MASK_KIND",
         "HAS_DROPOUT", "PRECISION"]
_JIT = {
    "fwd": _attn_fwd_kernel,
    "weights": _attn_fwd_kernel,
    "bwd_preprocess": _attn_bwd_preprocess_kernel,
    "bwd_stats": _attn_bwd_dq_kernel,
    "bwd_dkdv": _attn_bwd_dkdv_kernel,
    "bwd_dq": _attn_bwd_dq_kernel,
}
_TUNED: dict[str, object] = {}


def _launcher(kernel: str):
    """The kernel to call: autotuned on a GPU, the plain JIT function (given an explicit
    config by the caller) under the interpreter."""
    if INTERPRET:
        return _JIT[kernel]
    tuned = _TUNED.get(kernel)
    if tuned is None:
        keys = ["BLOCK_DV", "HAS_GRAD_LSE"] if kernel == "bwd_preprocess" else _KEYS
        tuned = triton.autotune(_all_configs(kernel), key=keys,
                                prune_configs_by={"early_config_prune": _prune(kernel)})(
            _JIT[kernel])
        _TUNED[kernel] = tuned
    return tuned


def _interpret_meta(kernel: str, bq: int, bk: int) -> dict[str, int]:
    if not INTERPRET:
        return {}
    if kernel == "bwd_preprocess":
        return {"BLOCK_M": 32}
    bm, bn = _INTERPRET_TILE
    if bq:
        bm = min(bm, _pow2(bq))
    if bk:
        bn = min(bn, _pow2(bk))
    return {"BLOCK_M": bm, "BLOCK_N": bn}


# ---------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the kernels' dots: float32 inputs run IEEE fp32 dots unless
    TF32 is allowed for CUDA matmuls (``torch.backends.cuda.matmul.allow_tf32``, or its
    newer spelling ``fp32_precision == "tf32"``); half inputs ignore it."""
    if dtype != torch.float32 or INTERPRET:
        return "ieee"
    matmul = torch.backends.cuda.matmul
    # Once the new API was used torch refuses to read allow_tf32; fp32_precision follows
    # both spellings (allow_tf32 = True sets it to "tf32").
    precision = getattr(matmul, "fp32_precision", None)
    tf32 = precision == "tf32" if isinstance(precision, str) else bool(matmul.allow_tf32)
    return "tf32" if tf32 else "ieee"


def _seed_words(seed: int | None) -> tuple[int, int]:
    seed = 0 if seed is None else int(seed) & (2**64 - 1)
    return seed & 0xFFFFFFFF, seed >> 32


class _Problem:
    """Shapes, strides and mask arguments shared by the attention launchers."""

    def __init__(self, q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, scale,
                 dropout_seed, block_mask, block_size):
        self.b, self.hq, self.lq, self.d = q.shape
        self.hkv, self.lk, self.dv = k.shape[1], k.shape[2], v.shape[3]
        self.group = self.hq // self.hkv
        self.device = q.device
        self.dtype = q.dtype
        dummy = torch.empty(1, dtype=torch.uint8, device=q.device)
        self.dummy_i32 = torch.empty(1, dtype=torch.int32, device=q.device)
        if attn_mask is None:
            self.mask_kind, self.mask, self.mask_strides = 0, dummy, (0, 0, 0, 0)
        elif attn_mask.dtype == torch.bool:
            # same bytes, any strides: view(dtype) of an equal-size dtype keeps the strides
            self.mask_kind, self.mask = 1, attn_mask.view(torch.uint8)
            self.mask_strides = attn_mask.stride()
        else:
            self.mask_kind, self.mask = 2, attn_mask
            self.mask_strides = attn_mask.stride()
        if key_padding_mask is None:
            self.has_kpm, self.kpm, self.kpm_strides = False, dummy, (0, 0)
        else:
            self.has_kpm, self.kpm = True, key_padding_mask.view(torch.uint8)
            self.kpm_strides = key_padding_mask.stride()
        self.is_causal = bool(is_causal)
        self.dropout_p = float(dropout_p)
        self.has_dropout = self.dropout_p > 0.0
        self.drop_scale = 0.0 if self.dropout_p >= 1.0 else 1.0 / (1.0 - self.dropout_p)
        self.scale = float(scale)
        self.seed_lo, self.seed_hi = _seed_words(dropout_seed)
        self.block_d = _pow2(self.d)
        self.block_dv = _pow2(self.dv)
        self.precision = dot_precision(q.dtype)
        if block_mask is None:
            self.has_blocks = False
            self.bq = self.bk = self.pq = self.pk = self.nbq = self.nbk = 0
            self.bm = self.hm = 1
            self.kv_num = self.kv_idx = self.q_num = self.q_idx = self.dummy_i32
            self.part_idx, self.part_masks, self.part_strides = self.dummy_i32, dummy, (0, 0, 0)
        else:
            kv_num, kv_idx, q_num, q_idx, _full, part_idx, part_masks = block_mask
            self.has_blocks = True
            self.bq, self.bk = int(block_size[0]), int(block_size[1])
            self.bm, self.hm, self.nbq, self.nbk = part_idx.shape
            self.kv_num, self.kv_idx = kv_num.contiguous(), kv_idx.contiguous()
            self.q_num, self.q_idx = q_num.contiguous(), q_idx.contiguous()
            self.part_idx = part_idx.contiguous()
            self.pq, self.pk = part_masks.shape[1], part_masks.shape[2]
            if part_masks.numel() == 0:
                self.part_masks, self.part_strides = dummy, (0, 0, 0)
            else:
                self.part_masks = part_masks.view(torch.uint8)
                self.part_strides = part_masks.stride()

    def query_tiles(self, block_m: int) -> int:
        if self.has_blocks:
            return self.nbq * triton.cdiv(self.bq, block_m)
        return triton.cdiv(self.lq, block_m)

    def key_tiles(self, block_n: int) -> int:
        if self.has_blocks:
            return self.nbk * triton.cdiv(self.bk, block_n)
        return triton.cdiv(self.lk, block_n)

    def mask_args(self) -> tuple:
        return (*self.mask_strides, *self.kpm_strides, *self.part_strides,
                self.hq, self.group, self.lq, self.lk, self.d, self.dv, self.bq, self.bk,
                self.pq, self.pk, self.nbq, self.nbk, self.bm, self.hm,
                self.scale, self.dropout_p, self.drop_scale, self.seed_lo, self.seed_hi)

    def flags(self) -> dict:
        return dict(MASK_KIND=self.mask_kind, HAS_KPM=self.has_kpm, IS_CAUSAL=self.is_causal,
                    HAS_BLOCKS=self.has_blocks, HAS_DROPOUT=self.has_dropout,
                    PRECISION=self.precision, BLOCK_D=self.block_d, BLOCK_DV=self.block_dv)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                      is_causal: bool, dropout_p: float, scale: float,
                      dropout_seed: int | None, return_weights: bool,
                      block_mask: list[torch.Tensor] | None = None,
                      block_size: list[int] | None = None, keep_fp32_out: bool = False,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, lse, weights, out_fp32)`` (see :mod:`mmattn.backends`): ``out (B, Hq, Lq,
    Dv)`` in q's dtype, ``lse (B, Hq, Lq)`` float32, ``weights (B, Hq, Lq, Lk)`` or empty,
    ``out_fp32`` float32 or empty. Inputs are validated by the caller."""
    pr = _Problem(q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, scale,
                  dropout_seed, block_mask, block_size)
    b, hq, lq, lk, dv = pr.b, pr.hq, pr.lq, pr.lk, pr.dv
    # every row is written by the kernel (rows with no visible key too)
    out = torch.empty(b, hq, lq, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, lq, dtype=torch.float32, device=q.device)
    keep = keep_fp32_out and q.dtype in (torch.float16, torch.bfloat16)
    out_fp32 = (torch.empty(b, hq, lq, dv, dtype=torch.float32, device=q.device) if keep
                else q.new_empty(0))
    weights = (torch.zeros(b, hq, lq, lk, dtype=q.dtype, device=q.device) if return_weights
               else q.new_empty(0))
    if b * hq * lq == 0:
        return out, lse, weights, out_fp32
    # lse's rounding error, for the weights pass only (see _attn_fwd_kernel)
    lse_lo = torch.empty(b, hq, lq, dtype=torch.float32, device=q.device) if return_weights \
        else lse
    args = (q, k, v, out, out_fp32 if keep else out, lse, lse_lo,
            weights if return_weights else out, pr.mask, pr.kpm, pr.kv_num, pr.kv_idx,
            pr.part_idx, pr.part_masks,
            *q.stride(), *k.stride(), *v.stride(), *pr.mask_args())

    def grid(meta):
        return (pr.query_tiles(meta["BLOCK_M"]), b * hq)

    _launcher("fwd")[grid](*args, **pr.flags(), KEEP_F32=keep, WEIGHTS_PASS=False,
                           SAVE_LSE_LO=return_weights, **_interpret_meta("fwd", pr.bq, pr.bk))
    if return_weights and lk:
        _launcher("weights")[grid](*args, **pr.flags(), KEEP_F32=False, WEIGHTS_PASS=True,
                                   SAVE_LSE_LO=False,
                                   **_interpret_meta("weights", pr.bq, pr.bk))
    return out, lse, weights, out_fp32


def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                       attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                       is_causal: bool, dropout_p: float, scale: float,
                       dropout_seed: int | None, block_mask: list[torch.Tensor] | None = None,
                       block_size: list[int] | None = None,
                       grad_lse: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, contiguous, in the inputs' dtype; dk/dv summed over each GQA
    group. ``out`` is the forward's output (float32 when it kept one), ``lse`` its
    float32 log-sum-exp, ``grad_lse`` (B, Hq, Lq) or None."""
    pr = _Problem(q, k, v, attn_mask, key_padding_mask, is_causal, dropout_p, scale,
                  dropout_seed, block_mask, block_size)
    b, hq, hkv, lq, lk = pr.b, pr.hq, pr.hkv, pr.lq, pr.lk
    if b * hq * lq == 0 or lk == 0:
        return (torch.zeros(q.shape, dtype=q.dtype, device=q.device),
                torch.zeros(k.shape, dtype=k.dtype, device=q.device),
                torch.zeros(v.shape, dtype=v.dtype, device=q.device))
    # every element is written by one program (no accumulation across programs)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=q.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=q.device)
    lse = lse.contiguous()
    delta = torch.empty(b, hq, lq, dtype=torch.float32, device=q.device)
    has_grad_lse = grad_lse is not None
    glse = grad_lse.float().contiguous() if has_grad_lse else delta
    pre_meta = _interpret_meta("bwd_preprocess", 0, 0)
    _launcher("bwd_preprocess")[lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), b * hq)](
        out, grad_out, glse, delta, *out.stride(), *grad_out.stride(), hq, lq, pr.dv,
        HAS_GRAD_LSE=has_grad_lse, BLOCK_DV=pr.block_dv, **pre_meta)

    common = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *pr.mask_args())
    # The stats pass writes lam and recomputes delta of every row with a visible key (see
    # _attn_bwd_dq_kernel); dQ and dK/dV read both.
    lam = torch.zeros(b, hq, lq, dtype=torch.float32, device=q.device)
    dq_args = (q, k, v, grad_out, lse, lam, delta, glse, dq, pr.mask, pr.kpm, pr.kv_num,
               pr.kv_idx, pr.part_idx, pr.part_masks, *common)
    for kernel in ("bwd_stats", "bwd_dq"):
        _launcher(kernel)[lambda meta: (pr.query_tiles(meta["BLOCK_M"]), b * hq)](
            *dq_args, **pr.flags(), HAS_GRAD_LSE=has_grad_lse,
            STATS_PASS=kernel == "bwd_stats", **_interpret_meta(kernel, pr.bq, pr.bk))
    _launcher("bwd_dkdv")[lambda meta: (pr.key_tiles(meta["BLOCK_N"]), b * hkv)](
        q, k, v, grad_out, lse, lam, delta, dk, dv, pr.mask, pr.kpm, pr.q_num, pr.q_idx,
        pr.part_idx, pr.part_masks, *common, **pr.flags(),
        G_P2=triton.next_power_of_2(pr.group), **_interpret_meta("bwd_dkdv", pr.bq, pr.bk))
    return dq, dk, dv
