"""Fused Triton kernels of Mamba-1's selective scan: a token-by-token scan and its chunked reverse pass
(the math: docs/math/mamba.md).

Inputs arrive packed: u, delta, z ``[L, D]``, B, C ``[L, G, N]`` (channel d
reads group ``d // (D // G)``), A ``[D, N]``, with ``L`` the total number of
tokens and sequence boundaries in a :class:`~seqmix.kernels.sequences.Chunking`.
One program owns one sequence and a block of channels and keeps their
``[BD, N]`` state in registers, scanning the tokens in order:
``h = exp(delta' A) h + delta' u B``, ``y = h C + D u``, ``y *= silu(z)``.
The state is diagonal per channel, so there is nothing for the tensor cores;
the scan is bound by reading the inputs once.

The forward keeps the state entering every chunk of ``CHUNK`` tokens
(``N / CHUNK`` floats per token and channel). The backward walks the chunks in
reverse: it recomputes the chunk's states from its checkpoint into a scratch
buffer private to the program (in L2 on a GPU), then runs the reverse
recurrence over the chunk's tokens with the state gradient in registers.
Decoding uses the forward without checkpoints.

Reductions over channels (dB, dC) and over tokens (dA, dD) are written as
partial sums per block of channels or per sequence and added up on the host,
so results do not depend on the order of atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqmix.kernels.alloc import empty
from seqmix.kernels.sequences import Chunking
from seqmix.kernels.triton_common import SOFTPLUS_THRESHOLD, autotune, autotune_configs, head_block, sequence_bounds
from seqmix.kernels.triton_limits import SCAN_CHUNK as CHUNK

# The backward's channel block is fixed (not tuned): it sizes the scratch buffer the host allocates.
BD_BWD = 32


def _fwd_configs():
    return autotune_configs([triton.Config({"BD": bd}, num_warps=w) for bd, w in ((64, 4), (32, 4), (128, 8))])


def _bwd_configs():
    # One warp: each token's sums over the block's channels (dB's and dC's partial rows) are then warp shuffles,
    # not a round through shared memory with barriers. On the H200 the backward ran at 3.7% of its floor with
    # 4 warps, the fastest of 2, 4 and 8 (docs/design.md, "Twenty-third round"); whether one warp wins is the
    # next GPU run's to say (the first config stays the interpreter's).
    return autotune_configs([triton.Config({}, num_warps=w) for w in (4, 2, 8, 1)])


@triton.jit
def _channels(i_nd, DIM: tl.constexpr, G: tl.constexpr, N: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr):
    """Sequence, channel block, channel offsets and mask, each channel's group, and the [BD, BN]
    offsets and mask of a program's slice of a [D, N] matrix."""
    n_db = tl.cdiv(DIM, BD)
    i_n, i_db = i_nd // n_db, i_nd % n_db
    o_d = i_db * BD + tl.arange(0, BD)
    o_n = tl.arange(0, BN)
    m_d = o_d < DIM
    m_dn = m_d[:, None] & (o_n < N)[None, :]
    return i_n, i_db, o_d, m_d, o_d // (DIM // G), o_d[:, None] * N + o_n[None, :], m_dn


@triton.jit
def _per_channel(base, o_d, m_d, HAS: tl.constexpr):
    """A [D] parameter's block as float32, or zeros when absent."""
    if HAS:
        return tl.load(base + o_d, mask=m_d, other=0.0).to(tl.float32)
    return tl.zeros(o_d.shape, dtype=tl.float32)


@autotune(configs=_fwd_configs(), key=["DIM", "N"])
@triton.jit
def selective_scan_recurrent_fwd_kernel(
    u, delta, A, B, C, D, z, delta_bias, out, hc, h0, ht, chunk_offsets, cu_seqlens,
    DIM: tl.constexpr, G: tl.constexpr, N: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, CH: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, STORE_CHUNKS: tl.constexpr,
):
    """Scan one sequence's tokens for a block of channels; with STORE_CHUNKS keep the state
    entering every chunk of CH tokens for the backward."""
    i_n, _, o_d, m_d, grp, s_off, m_dn = _channels(tl.program_id(0), DIM, G, N, BD, BN)
    bos, eos = sequence_bounds(cu_seqlens, i_n)
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    s_base = i_n.to(tl.int64) * DIM * N
    b_a = tl.load(A + s_off, mask=m_dn, other=0.0).to(tl.float32)
    b_bias = _per_channel(delta_bias, o_d, m_d, HAS_BIAS)
    b_skip = _per_channel(D, o_d, m_d, HAS_D)
    b_h = tl.zeros([BD, BN], dtype=tl.float32)
    if HAS_H0:
        b_h += tl.load(h0 + s_base + s_off, mask=m_dn, other=0.0)
    # The token loops call no jit helpers: in Triton's interpreter every such call costs milliseconds.
    bc = (bos * G + grp[:, None]) * N + tl.arange(0, BN)[None, :]
    row = bos * DIM + o_d
    for t in range(bos, eos):
        if STORE_CHUNKS:  # noqa: SIM102 (a compile-time branch around a run-time one)
            if (t - bos) % CH == 0:
                tl.store(hc + (c0 + (t - bos) // CH) * DIM * N + s_off, b_h, mask=m_dn)
        b_u = tl.load(u + row, mask=m_d, other=0.0).to(tl.float32)
        b_delta = tl.load(delta + row, mask=m_d, other=0.0).to(tl.float32) + b_bias
        if SOFTPLUS:
            b_delta = tl.where(b_delta > SOFTPLUS_THRESHOLD, b_delta,
                               tl.log(1.0 + tl.exp(tl.minimum(b_delta, SOFTPLUS_THRESHOLD))))
        b_b = tl.load(B + bc, mask=m_dn, other=0.0).to(tl.float32)
        b_h = tl.exp(b_delta[:, None] * b_a) * b_h + (b_delta * b_u)[:, None] * b_b
        b_y = tl.sum(b_h * tl.load(C + bc, mask=m_dn, other=0.0).to(tl.float32), 1) + b_skip * b_u
        if HAS_Z:
            b_z = tl.load(z + row, mask=m_d, other=0.0).to(tl.float32)
            b_y = b_y * b_z / (1.0 + tl.exp(-b_z))
        tl.store(out + row, b_y.to(out.dtype.element_ty), mask=m_d)
        bc += G * N
        row += DIM
    if STORE_HT:
        tl.store(ht + s_base + s_off, b_h, mask=m_dn)


@autotune(configs=_bwd_configs(), key=["DIM", "N"])
@triton.jit
def selective_scan_recurrent_bwd_kernel(
    u, delta, A, B, C, D, z, delta_bias, dout, hc, scratch, dht, du, ddelta, dz, da_part, dd_part, db_part,
    dc_part, dh0, chunk_offsets, cu_seqlens, part_stride,
    DIM: tl.constexpr, G: tl.constexpr, N: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, CH: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
):
    """Reverse over one sequence's chunks for a block of channels. Per chunk: the states after
    each token are recomputed from the checkpoint into ``scratch`` (slot 0 = the state entering),
    then, from the last token back, with dh = gradient of the state after token t:

    dh += dy C;  du = delta' (dh . B) + D dy;  d(delta') = dh . (A exp(delta' A) h_prev + u B);
    dA += dh delta' exp(delta' A) h_prev;  dB += sum_d dh delta' u;  dC += sum_d dy h;
    then dh *= exp(delta' A) for the token before.
    """
    i_nd = tl.program_id(0)
    i_n, i_db, o_d, m_d, grp, s_off, m_dn = _channels(i_nd, DIM, G, N, BD, BN)
    bos, eos = sequence_bounds(cu_seqlens, i_n)
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    s_base = i_n.to(tl.int64) * DIM * N
    slot = BD * BN
    scr = scratch + i_nd.to(tl.int64) * (CH + 1) * slot + (tl.arange(0, BD)[:, None] * BN + tl.arange(0, BN)[None, :])
    part = i_db.to(tl.int64) * part_stride
    per_group = DIM // G
    g_lo = (i_db * BD) // per_group
    g_hi = (tl.minimum(i_db * BD + BD, DIM) - 1) // per_group
    b_a = tl.load(A + s_off, mask=m_dn, other=0.0).to(tl.float32)
    b_bias = _per_channel(delta_bias, o_d, m_d, HAS_BIAS)
    b_skip = _per_channel(D, o_d, m_d, HAS_D)
    b_dh = tl.zeros([BD, BN], dtype=tl.float32)
    if HAS_DHT:
        b_dh += tl.load(dht + s_base + s_off, mask=m_dn, other=0.0)
    b_da = tl.zeros([BD, BN], dtype=tl.float32)
    b_dd = tl.zeros([BD], dtype=tl.float32)
    NT = tl.cdiv(eos - bos, CH)
    o_n = tl.arange(0, BN)
    m_n = o_n < N
    # As in the forward, the token loops call no jit helpers (costly in the interpreter).
    for j in range(NT):
        t0 = bos + (NT - 1 - j) * CH
        nt = tl.minimum(eos - t0, CH)
        b_h = tl.load(hc + (c0 + NT - 1 - j) * DIM * N + s_off, mask=m_dn, other=0.0)
        tl.store(scr, b_h)
        bc = (t0 * G + grp[:, None]) * N + o_n[None, :]
        row = t0 * DIM + o_d
        for i in range(nt):
            b_u = tl.load(u + row, mask=m_d, other=0.0).to(tl.float32)
            b_delta = tl.load(delta + row, mask=m_d, other=0.0).to(tl.float32) + b_bias
            if SOFTPLUS:
                b_delta = tl.where(b_delta > SOFTPLUS_THRESHOLD, b_delta,
                                   tl.log(1.0 + tl.exp(tl.minimum(b_delta, SOFTPLUS_THRESHOLD))))
            b_b = tl.load(B + bc, mask=m_dn, other=0.0).to(tl.float32)
            b_h = tl.exp(b_delta[:, None] * b_a) * b_h + (b_delta * b_u)[:, None] * b_b
            tl.store(scr + (i + 1) * slot, b_h)
            bc += G * N
            row += DIM
        tl.debug_barrier()
        for k in range(nt):
            i = nt - 1 - k
            t = t0 + i
            bc -= G * N
            row -= DIM
            b_u = tl.load(u + row, mask=m_d, other=0.0).to(tl.float32)
            raw = tl.load(delta + row, mask=m_d, other=0.0).to(tl.float32) + b_bias
            b_delta = raw
            if SOFTPLUS:
                b_delta = tl.where(raw > SOFTPLUS_THRESHOLD, raw,
                                   tl.log(1.0 + tl.exp(tl.minimum(raw, SOFTPLUS_THRESHOLD))))
            b_b = tl.load(B + bc, mask=m_dn, other=0.0).to(tl.float32)
            b_c = tl.load(C + bc, mask=m_dn, other=0.0).to(tl.float32)
            b_h = tl.load(scr + (i + 1) * slot)
            b_prev = tl.load(scr + i * slot)
            b_dy = tl.load(dout + row, mask=m_d, other=0.0).to(tl.float32)
            if HAS_Z:
                b_z = tl.load(z + row, mask=m_d, other=0.0).to(tl.float32)
                sig = 1.0 / (1.0 + tl.exp(-b_z))
                b_y = tl.sum(b_h * b_c, 1) + b_skip * b_u
                tl.store(dz + row, (b_dy * b_y * sig * (1 + b_z * (1 - sig))).to(dz.dtype.element_ty), mask=m_d)
                b_dy = b_dy * b_z * sig
            b_dh += b_dy[:, None] * b_c
            # dC and dB sum over channels: one partial row per group this block touches.
            b_dc_rows = b_dy[:, None] * b_h
            b_db_rows = b_dh * (b_delta * b_u)[:, None]
            for g in range(g_lo, g_hi + 1):
                in_g = ((grp == g) & m_d)[:, None]
                at = part + (t * G + g) * N + o_n
                tl.store(dc_part + at, tl.sum(tl.where(in_g, b_dc_rows, 0.0), 0), mask=m_n)
                tl.store(db_part + at, tl.sum(tl.where(in_g, b_db_rows, 0.0), 0), mask=m_n)
            decay = tl.exp(b_delta[:, None] * b_a)
            b_decayed = b_dh * decay * b_prev
            b_da += b_decayed * b_delta[:, None]
            b_dd += b_dy * b_u
            b_ddelta = tl.sum(b_decayed * b_a + b_dh * b_u[:, None] * b_b, 1)
            if SOFTPLUS:
                b_ddelta = tl.where(raw > SOFTPLUS_THRESHOLD, b_ddelta, b_ddelta / (1.0 + tl.exp(-raw)))
            tl.store(ddelta + row, b_ddelta, mask=m_d)
            b_du = b_delta * tl.sum(b_dh * b_b, 1) + b_skip * b_dy
            tl.store(du + row, b_du.to(du.dtype.element_ty), mask=m_d)
            b_dh = b_dh * decay
        tl.debug_barrier()
    tl.store(da_part + s_base + s_off, b_da, mask=m_dn)
    tl.store(dd_part + i_n.to(tl.int64) * DIM + o_d, b_dd, mask=m_d)
    if STORE_DH0:
        tl.store(dh0 + s_base + s_off, b_dh, mask=m_dn)


KERNELS = (selective_scan_recurrent_fwd_kernel, selective_scan_recurrent_bwd_kernel)


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, h0, delta_softplus: bool, chunking: Chunking,
                       store_final: bool, store_chunks: bool):
    """Forward scan. Returns (out [L, D], final state [Nseq, D, N] float32 or None, and the states
    entering each chunk [NC, D, N] float32 when ``store_chunks``, else None)."""
    L, DIM = u.shape
    G, N = B.shape[1:]
    Nseq = chunking.num_sequences
    out = empty(L, DIM, dtype=u.dtype, device=u.device)
    ht = empty(Nseq, DIM, N, dtype=torch.float32, device=u.device) if store_final else None
    hc = empty(chunking.num_chunks, DIM, N, dtype=torch.float32, device=u.device) if store_chunks else None
    selective_scan_recurrent_fwd_kernel[lambda meta: (Nseq * triton.cdiv(DIM, meta["BD"]),)](
        u, delta, A, B, C, D, z, delta_bias, out, hc, h0, ht, chunking.chunk_offsets, chunking.cu_seqlens,
        DIM=DIM, G=G, N=N, BN=head_block(N), CH=CHUNK, HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, HAS_H0=h0 is not None, STORE_HT=store_final,
        STORE_CHUNKS=store_chunks,
    )
    return out, ht, hc


def selective_scan_bwd(u, delta, A, B, C, D, z, delta_bias, hc, delta_softplus: bool, chunking: Chunking, dout, dht,
                       need_dh0: bool):
    """Backward. Returns du, ddelta, dz (inputs' dtypes; dz None without z) and dA, dB, dC, dD,
    ddelta_bias (float32, None where absent), dh0 (float32) or None."""
    L, DIM = u.shape
    G, N = B.shape[1:]
    Nseq = chunking.num_sequences
    BN = head_block(N)
    n_db = triton.cdiv(DIM, BD_BWD)
    dev = u.device
    scratch = torch.empty(Nseq * n_db, CHUNK + 1, BD_BWD, BN, dtype=torch.float32, device=dev)
    du = empty(L, DIM, dtype=u.dtype, device=dev)
    ddelta = empty(L, DIM, dtype=torch.float32, device=dev)
    dz = empty(L, DIM, dtype=z.dtype, device=dev) if z is not None else None
    da_part = empty(Nseq, DIM, N, dtype=torch.float32, device=dev)
    dd_part = empty(Nseq, DIM, dtype=torch.float32, device=dev)
    # Zeroed, not poisoned: a block of channels writes only the groups it touches.
    db_part = torch.zeros(n_db, L, G, N, dtype=torch.float32, device=dev)
    dc_part = torch.zeros(n_db, L, G, N, dtype=torch.float32, device=dev)
    dh0 = empty(Nseq, DIM, N, dtype=torch.float32, device=dev) if need_dh0 else None
    selective_scan_recurrent_bwd_kernel[(Nseq * n_db,)](
        u, delta, A, B, C, D, z, delta_bias, dout, hc, scratch, dht, du, ddelta, dz, da_part, dd_part, db_part,
        dc_part, dh0, chunking.chunk_offsets, chunking.cu_seqlens, L * G * N,
        DIM=DIM, G=G, N=N, BN=BN, BD=BD_BWD, CH=CHUNK, HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, HAS_DHT=dht is not None, STORE_DH0=need_dh0,
    )
    dd = None if D is None else dd_part.sum(0)
    ddelta_bias = None if delta_bias is None else ddelta.sum(0)
    return (du, ddelta.to(delta.dtype), dz, da_part.sum(0), db_part.sum(0), dc_part.sum(0), dd, ddelta_bias, dh0)
