using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace AnyPrecML.Kernels;

// The int8 level on AVX-512 with VBMI and GFNI (Zen 4/5, Ice Lake and later Xeons); x8 in column order, each token
// Int8TokenStride bytes apart (a multiple of 64). One token, and 2-4 where FewTokensInRegisters says so: the products
// straight from the lookups (DotVbmi512). More: each row decoded to bytes by the same steps, then the AVX2 register
// tiles over every token. A block is 256 columns:
// 32 bytes of each plane, byte i holding columns 8i..8i+7.
//  1. Gather: vpermi2b over two planes per 512-bit register builds, for 8 plane bytes i at a time, one qword per i
//     with plane p's byte at position 8 - b + p (planes 0..3 from one pair of registers, 4..7 from the other, merged
//     by one vpternlogd at b ≥ 5). The other 8 - b positions hold whatever the index picks.
//  2. Transpose: gf2p8affineqb with the qword as the matrix turns it into 8 codes, byte k the code of column 8i + k
//     (position 7 - j of the qword gives code bit j). So 64 codes come out in column order: x8 needs no permutation.
//  3. Lookup: vpermb reads the low 6 code bits in one 64-byte table, vpermi2b 7 bits in two, and b = 8 picks
//     between two vpermi2b on bit 7. Below b = 6 the row's table is repeated across the register, so the bits above
//     b (from the free positions) never matter.
//  4. Products: with AVX-VNNI the tables are read offset by 128 and the two 256-bit halves go to vpdpbusd with x8 as
//     it is (see TableBytes); without it (Zen 4) |x|·(v·sign x) by vpmaddubsw + vpmaddwd (AVX-512 has no vpsignb).
// About 6 vector ops per 64 weights at b ≤ 4 and 8-11 at b ≥ 5, against ~13 and ~36 for the AVX2 slices: the gather
// and transpose cost the same at every b, so b = 5..8 cost little more than b = 4 (see docs/BENCHMARKS.md).
public static unsafe partial class BitplaneKernels
{
    /// <summary>
    /// Int8 rows on AVX-512 + VBMI + GFNI: y[t, r] = Σ_j U[r, c_j]·x8[t, j] (the caller rescales and removes the offset);
    /// x8 in column order, <paramref name="xStride"/> apart (a multiple of 64), readable 64 bytes past the last column
    /// (zero weights meet whatever lies there).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void RowsInt8Vbmi512(in BitplaneOperand w, byte* u, sbyte* x8, byte* xAbs, sbyte* xSign, int* xSum, int xStride, int m, float* y, int rowStart, int rowEnd, byte* scratch)
    {
        switch (w.Bits)
        {
            case 2: RowsInt8Vbmi512<Width2>(w, u, x8, xAbs, xSign, xSum, xStride, m, y, rowStart, rowEnd, scratch); break;
            case 3: RowsInt8Vbmi512<Width3>(w, u, x8, xAbs, xSign, xSum, xStride, m, y, rowStart, rowEnd, scratch); break;
            case 4: RowsInt8Vbmi512<Width4>(w, u, x8, xAbs, xSign, xSum, xStride, m, y, rowStart, rowEnd, scratch); break;
            case 5: RowsInt8Vbmi512<Width5>(w, u, x8, xAbs, xSign, xSum, xStride, m, y, rowStart, rowEnd, scratch); break;
            case 6: RowsInt8Vbmi512<Width6>(w, u, x8, xAbs, xSign, xSum, xStride, m, y, rowStart, rowEnd, scratch); break;
            case 7: RowsInt8Vbmi512<Width7>(w, u, x8, xAbs, xSign, xSum, xStride, m, y, rowStart, rowEnd, scratch); break;
            default: RowsInt8Vbmi512<Width8>(w, u, x8, xAbs, xSign, xSum, xStride, m, y, rowStart, rowEnd, scratch); break;
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void RowsInt8Vbmi512<TW>(in BitplaneOperand w, byte* u0, sbyte* x8, byte* xAbs, sbyte* xSign, int* xSum, int xStride, int m, float* y, int rowStart, int rowEnd, byte* scratch)
        where TW : struct, IWidth
    {
        int k = 1 << TW.Bits;
        byte* tail = scratch; // a partial last block: its plane words (b × 32 bytes, zero-padded), and at 256 its decoded bytes
        // One token, and 2-4 where that is faster (FewTokensInRegisters): the products straight from the lookups.
        if (m == 1 || FewTokensInRegisters(KernelPath.Vector512, m, TW.Bits))
        {
            switch (m)
            {
                case 1: RowsDotVbmi512<TW, Tokens1>(w, u0, x8, xAbs, xSign, xSum, xStride, y, rowStart, rowEnd, tail); break;
                case 2: RowsDotVbmi512<TW, Tokens2>(w, u0, x8, xAbs, xSign, xSum, xStride, y, rowStart, rowEnd, tail); break;
                case 3: RowsDotVbmi512<TW, Tokens3>(w, u0, x8, xAbs, xSign, xSum, xStride, y, rowStart, rowEnd, tail); break;
                default: RowsDotVbmi512<TW, Tokens4>(w, u0, x8, xAbs, xSign, xSum, xStride, y, rowStart, rowEnd, tail); break;
            }
            return;
        }
        // Several tokens (verify passes, prefill): a group of rows decoded to table bytes once, in column order with
        // zeros up to the stride, then the AVX2 register tiles over every token (as on AVX2, with this decoder).
        byte* decoded = scratch + 256;
        for (int g = rowStart; g < rowEnd; g += Int8RowGroup)
        {
            int rows = Math.Min(Int8RowGroup, rowEnd - g);
            for (int i = 0; i < rows; i++)
                DecodeVbmi512<TW>(w, w.Planes + (long)(g + i) * w.Words, u0 + (long)(g + i) * k, decoded + (long)i * xStride, tail);
            TileInt8Avx2<TableBytes>(decoded, rows, xStride, x8, xAbs, xSum, m, y + g, w.Rows);
        }
    }

    /// <summary>One row's table bytes in column order, zero from the last column to the next multiple of 64.</summary>
    [SkipLocalsInit]
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void DecodeVbmi512<TW>(in BitplaneOperand w, uint* planes, byte* u, byte* dst, byte* tail) where TW : struct, IWidth
    {
        int b = TW.Bits, full = w.Cols >> 8;
        var (t0, t1, t2, t3) = TableRegisters<TW>(u);
        var eight = Vector512.Create((byte)8);
        var lo0 = GatherLow[b]; var lo1 = lo0 + eight; var lo2 = lo1 + eight; var lo3 = lo2 + eight;
        var hi0 = GatherHigh[b]; var hi1 = hi0 + eight; var hi2 = hi1 + eight; var hi3 = hi2 + eight;
        var merge = GatherMerge[b];
        long stride = w.PlaneStride * 4;
        byte* src = (byte*)planes;
        for (int block = 0; block < full; block++, src += 32, dst += 256)
        {
            var (z01, z23, z45, z67) = PlanePairs<TW>(src, stride);
            Lookup512<TW>(Codes512<TW>(z01, z23, z45, z67, lo0, hi0, merge), t0, t1, t2, t3).Store(dst);
            Lookup512<TW>(Codes512<TW>(z01, z23, z45, z67, lo1, hi1, merge), t0, t1, t2, t3).Store(dst + 64);
            Lookup512<TW>(Codes512<TW>(z01, z23, z45, z67, lo2, hi2, merge), t0, t1, t2, t3).Store(dst + 128);
            Lookup512<TW>(Codes512<TW>(z01, z23, z45, z67, lo3, hi3, merge), t0, t1, t2, t3).Store(dst + 192);
        }
        if ((w.Cols & 255) != 0) DecodePartialBlockVbmi512<TW>(w, planes, u, dst, tail);
    }

    /// <summary>The partial last block of <see cref="DecodeVbmi512{TW}"/>: 64 bytes per group that holds columns, zero past the last column.</summary>
    [MethodImpl(MethodImplOptions.NoInlining)]
    private static void DecodePartialBlockVbmi512<TW>(in BitplaneOperand w, uint* planes, byte* u, byte* dst, byte* tail) where TW : struct, IWidth
    {
        int b = TW.Bits, left = w.Cols & 255;
        var (t0, t1, t2, t3) = TableRegisters<TW>(u);
        byte* src = BlockPlanes(w, planes, w.Cols >> 8, b, tail, out long stride);
        var (z01, z23, z45, z67) = PlanePairs<TW>(src, stride);
        var low = GatherLow[b];
        var high = GatherHigh[b];
        fixed (byte* mask = TailMask)
            for (int j = 0; j < left; j += 64, low += Vector512.Create((byte)8), high += Vector512.Create((byte)8))
                (Lookup512<TW>(Codes512<TW>(z01, z23, z45, z67, low, high, GatherMerge[b]), t0, t1, t2, t3) & Vector512.Load(mask + 64 - Math.Min(64, left - j))).Store(dst + j);
    }

    /// <summary>
    /// vpermi2b indices of the gather for b-bit codes (index [b]): output byte 8q + pos takes plane p = pos − (8 − b)'s
    /// byte q of the group, from the low pair of registers (planes 0..3: 32p + q) or, for p ≥ 4, the high pair
    /// (32(p − 4) + q). Group g adds 8g to every index. Positions below 8 − b read plane 0 (any byte would do).
    /// </summary>
    private static readonly Vector512<byte>[] GatherLow = Enumerable.Range(0, 9).Select(b => GatherIndex(b, high: false)).ToArray();
    private static readonly Vector512<byte>[] GatherHigh = Enumerable.Range(0, 9).Select(b => GatherIndex(b, high: true)).ToArray();

    /// <summary>Bytes taken from the high gather (planes 4..7) for b-bit codes: 0xFF at their positions.</summary>
    private static readonly Vector512<byte>[] GatherMerge = Enumerable.Range(0, 9).Select(b =>
        Vector512.Create(Enumerable.Range(0, 64).Select(i => (byte)(b >= 5 && i % 8 - (8 - b) >= 4 ? 0xFF : 0)).ToArray())).ToArray();

    /// <summary>0xFF for the first 64 bytes, 0 for the next 64: a load at 64 − n masks all but n bytes.</summary>
    private static readonly byte[] TailMask = Enumerable.Range(0, 128).Select(i => (byte)(i < 64 ? 0xFF : 0)).ToArray();

    private static Vector512<byte> GatherIndex(int b, bool high)
    {
        var index = new byte[64];
        if (b < 2) return Vector512<byte>.Zero;
        for (int q = 0; q < 8; q++)
            for (int pos = 0; pos < 8; pos++)
            {
                int p = pos - (8 - b);
                index[8 * q + pos] = (byte)(p < 0 ? q : high ? (p >= 4 ? 32 * (p - 4) + q : q) : (p < 4 ? 32 * p + q : q));
            }
        return Vector512.Create(index);
    }

    /// <summary>The row's table as the lookup registers want it: repeated to 64 bytes below b = 6 (see step 3), 128 bytes in two registers at b = 7, 256 in four at b = 8.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static (Vector512<byte>, Vector512<byte>, Vector512<byte>, Vector512<byte>) TableRegisters<TW>(byte* u) where TW : struct, IWidth
    {
        var t0 = TW.Bits switch
        {
            2 => Vector512.Create(*(uint*)u).AsByte(),
            3 => Vector512.Create(*(ulong*)u).AsByte(),
            4 => Vector512.Create(Vector128.Load(u)),
            5 => Vector512.Create(Vector256.Load(u)),
            _ => Vector512.Load(u),
        };
        return (t0, TW.Bits >= 7 ? Vector512.Load(u + 64) : default, TW.Bits == 8 ? Vector512.Load(u + 128) : default, TW.Bits == 8 ? Vector512.Load(u + 192) : default);
    }

    /// <summary>64 codes (column order) from the group's gathered plane bytes: see steps 1 and 2.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<byte> Codes512<TW>(Vector512<byte> z01, Vector512<byte> z23, Vector512<byte> z45, Vector512<byte> z67,
        Vector512<byte> low, Vector512<byte> high, Vector512<byte> merge) where TW : struct, IWidth
    {
        var q = Avx512Vbmi.PermuteVar64x8x2(z01, low, z23);
        if (TW.Bits > 4) q = Vector512.ConditionalSelect(merge, Avx512Vbmi.PermuteVar64x8x2(z45, high, z67), q);
        return Gfni.V512.GaloisFieldAffineTransform(BitIdentity, q, 0);
    }

    /// <summary>Table bytes of 64 codes: see step 3.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<byte> Lookup512<TW>(Vector512<byte> codes, Vector512<byte> t0, Vector512<byte> t1, Vector512<byte> t2, Vector512<byte> t3) where TW : struct, IWidth =>
        TW.Bits switch
        {
            <= 6 => Avx512Vbmi.PermuteVar64x8(t0, codes),
            7 => Avx512Vbmi.PermuteVar64x8x2(t0, codes, t1),
            _ => Avx512BW.BlendVariable(Avx512Vbmi.PermuteVar64x8x2(t0, codes, t1), Avx512Vbmi.PermuteVar64x8x2(t2, codes, t3), codes),
        };

    /// <summary>
    /// The 64 products of table bytes v with x8 at <paramref name="x"/> (|x8|, sign x8 at xa, xs), see step 4: into
    /// <paramref name="low"/> and <paramref name="high"/> (one vpdpbusd each) with VNNI, into <paramref name="wide"/> without.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Products512(ref Vector256<int> low, ref Vector256<int> high, ref Vector512<int> wide, Vector512<byte> v, sbyte* x, byte* xa, sbyte* xs)
    {
        if (TableBytes.Offset)
        {
            low = AvxVnni.MultiplyWideningAndAdd(low, v.GetLower(), Vector256.Load(x));
            high = AvxVnni.MultiplyWideningAndAdd(high, v.GetUpper(), Vector256.Load(x + 32));
            return;
        }
        var s = Vector512.Load(xs);
        var signed = (v.AsSByte() ^ s) - s;
        wide += Avx512BW.MultiplyAddAdjacent(Avx512BW.MultiplyAddAdjacent(Vector512.Load(xa), signed), Vector512.Create((short)1));
    }

    /// <summary>A block's planes two to a register (plane 2i low, 2i+1 high; a pair with no plane at all is zero, a missing second plane is left undefined).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static (Vector512<byte>, Vector512<byte>, Vector512<byte>, Vector512<byte>) PlanePairs<TW>(byte* src, long stride) where TW : struct, IWidth
    {
        int b = TW.Bits;
        return (PlanePair(src, stride, true), b > 2 ? PlanePair(src + 2 * stride, stride, b > 3) : default,
            b > 4 ? PlanePair(src + 4 * stride, stride, b > 5) : default, b > 6 ? PlanePair(src + 6 * stride, stride, b > 7) : default);
    }

    /// <summary>The plane at <paramref name="a"/> low and the next one (<paramref name="stride"/> on) high.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<byte> PlanePair(byte* a, long stride, bool hasSecond) =>
        // Without a second plane the upper half is left as it comes: no gather index of an odd b reads it.
        hasSecond ? Avx512F.InsertVector256(Vector256.Load(a).ToVector512Unsafe(), Vector256.Load(a + stride), 1) : Vector256.Load(a).ToVector512Unsafe();

    /// <summary>Rows against 1-4 tokens (<typeparamref name="TM"/>), <see cref="DotVbmi512{TW, TM}"/> each.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void RowsDotVbmi512<TW, TM>(in BitplaneOperand w, byte* u0, sbyte* x, byte* xa, sbyte* xs, int* xSum, int xStride, float* y, int rowStart, int rowEnd, byte* tail)
        where TW : struct, IWidth where TM : struct, ITokenCount
    {
        int k = 1 << TW.Bits;
        for (int r = rowStart; r < rowEnd; r++)
            DotVbmi512<TW, TM>(w, w.Planes + (long)r * w.Words, u0 + (long)r * k, x, xa, xs, xStride, xSum, y + r, tail);
    }

    /// <summary>
    /// One row against 1-4 tokens (<typeparamref name="TM"/>), <paramref name="xStride"/> apart: y[t·Rows] = token t's
    /// Σ_j V[c_j]·x8[t, j] (the offset taken off; written here, as a returned Vector128 goes through memory on SysV, which
    /// cost M = 1 3-5%). With VNNI each token has two accumulator chains (the two 256-bit halves), without it one 512-bit
    /// chain; one token alone takes a set per group of 64 columns, so that eight vpdpbusd chains (latency 4-5 cycles)
    /// are in flight. <paramref name="tail"/>:
    /// 512 bytes of scratch for a partial last block.
    /// </summary>
    [SkipLocalsInit]
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void DotVbmi512<TW, TM>(in BitplaneOperand w, uint* planes, byte* u, sbyte* x, byte* xa, sbyte* xs, int xStride, int* xSum, float* y, byte* tail)
        where TW : struct, IWidth where TM : struct, ITokenCount
    {
        int b = TW.Bits, full = w.Cols >> 8, n = TM.Count;
        var (t0, t1, t2, t3) = TableRegisters<TW>(u);
        // The gather indices of the block's four groups of 64 columns, kept in registers (AVX-512 has 32).
        var eight = Vector512.Create((byte)8);
        var lo0 = GatherLow[b]; var lo1 = lo0 + eight; var lo2 = lo1 + eight; var lo3 = lo2 + eight;
        var hi0 = GatherHigh[b]; var hi1 = hi0 + eight; var hi2 = hi1 + eight; var hi3 = hi2 + eight;
        var merge = GatherMerge[b];
        long stride = w.PlaneStride * 4;
        // Token t's chains: a (token 0), b, c, d; one token alone takes a pair per group (a, e, f, g).
        Vector256<int> a0 = default, a1 = default, b0 = default, b1 = default, c0 = default, c1 = default, d0 = default, d1 = default;
        Vector256<int> e0 = default, e1 = default, f0 = default, f1 = default, g0 = default, g1 = default;
        Vector512<int> aw = default, bw = default, cw = default, dw = default, ew = default, fw = default, gw = default;
        byte* src = (byte*)planes;
        long s1 = xStride, s2 = 2L * xStride, s3 = 3L * xStride;
        // |x8| and sign x8 as offsets from x8 (unused with VNNI): pointers advanced in the loop stayed live for the
        // partial block after it, two adds per block (M = 1 +3-5%).
        long da = (byte*)xa - (byte*)x, ds = (byte*)xs - (byte*)x;
        for (int block = 0; block < full; block++, src += 32, x += 256)
        {
            xa = (byte*)x + da;
            xs = x + ds;
            var (z01, z23, z45, z67) = PlanePairs<TW>(src, stride);
            var v0 = Lookup512<TW>(Codes512<TW>(z01, z23, z45, z67, lo0, hi0, merge), t0, t1, t2, t3);
            var v1 = Lookup512<TW>(Codes512<TW>(z01, z23, z45, z67, lo1, hi1, merge), t0, t1, t2, t3);
            Products512(ref a0, ref a1, ref aw, v0, x, xa, xs);
            if (n > 1) Products512(ref b0, ref b1, ref bw, v0, x + s1, xa + s1, xs + s1);
            if (n > 2) Products512(ref c0, ref c1, ref cw, v0, x + s2, xa + s2, xs + s2);
            if (n > 3) Products512(ref d0, ref d1, ref dw, v0, x + s3, xa + s3, xs + s3);
            if (n == 1) Products512(ref e0, ref e1, ref ew, v1, x + 64, xa + 64, xs + 64);
            else Products512(ref a0, ref a1, ref aw, v1, x + 64, xa + 64, xs + 64);
            if (n > 1) Products512(ref b0, ref b1, ref bw, v1, x + s1 + 64, xa + s1 + 64, xs + s1 + 64);
            if (n > 2) Products512(ref c0, ref c1, ref cw, v1, x + s2 + 64, xa + s2 + 64, xs + s2 + 64);
            if (n > 3) Products512(ref d0, ref d1, ref dw, v1, x + s3 + 64, xa + s3 + 64, xs + s3 + 64);
            var v2 = Lookup512<TW>(Codes512<TW>(z01, z23, z45, z67, lo2, hi2, merge), t0, t1, t2, t3);
            var v3 = Lookup512<TW>(Codes512<TW>(z01, z23, z45, z67, lo3, hi3, merge), t0, t1, t2, t3);
            if (n == 1) Products512(ref f0, ref f1, ref fw, v2, x + 128, xa + 128, xs + 128);
            else Products512(ref a0, ref a1, ref aw, v2, x + 128, xa + 128, xs + 128);
            if (n > 1) Products512(ref b0, ref b1, ref bw, v2, x + s1 + 128, xa + s1 + 128, xs + s1 + 128);
            if (n > 2) Products512(ref c0, ref c1, ref cw, v2, x + s2 + 128, xa + s2 + 128, xs + s2 + 128);
            if (n > 3) Products512(ref d0, ref d1, ref dw, v2, x + s3 + 128, xa + s3 + 128, xs + s3 + 128);
            if (n == 1) Products512(ref g0, ref g1, ref gw, v3, x + 192, xa + 192, xs + 192);
            else Products512(ref a0, ref a1, ref aw, v3, x + 192, xa + 192, xs + 192);
            if (n > 1) Products512(ref b0, ref b1, ref bw, v3, x + s1 + 192, xa + s1 + 192, xs + s1 + 192);
            if (n > 2) Products512(ref c0, ref c1, ref cw, v3, x + s2 + 192, xa + s2 + 192, xs + s2 + 192);
            if (n > 3) Products512(ref d0, ref d1, ref dw, v3, x + s3 + 192, xa + s3 + 192, xs + s3 + 192);
        }
        bool o = TableBytes.Offset;
        int sa = o ? Vector256.Sum(((a0 + a1) + (e0 + e1)) + ((f0 + f1) + (g0 + g1))) : Vector512.Sum((aw + ew) + (fw + gw));
        int sb = n < 2 ? 0 : o ? Vector256.Sum(b0 + b1) : Vector512.Sum(bw);
        int sc = n < 3 ? 0 : o ? Vector256.Sum(c0 + c1) : Vector512.Sum(cw);
        int sd = n < 4 ? 0 : o ? Vector256.Sum(d0 + d1) : Vector512.Sum(dw);
        if ((w.Cols & 255) != 0)
        {
            var p = PartialBlockVbmi512<TW, TM>(w, planes, u, x, (byte*)x + da, x + ds, xStride, tail);
            sa += p[0]; sb += p[1]; sc += p[2]; sd += p[3];
        }
        y[0] = sa - (o ? 128 * xSum[0] : 0);
        if (n > 1) y[w.Rows] = sb - (o ? 128 * xSum[1] : 0);
        if (n > 2) y[2L * w.Rows] = sc - (o ? 128 * xSum[2] : 0);
        if (n > 3) y[3L * w.Rows] = sd - (o ? 128 * xSum[3] : 0);
    }

    /// <summary>The partial last block of <see cref="DotVbmi512{TW, TM}"/>: decoded to bytes (zero past the last column), then multiplied 64 at a time.</summary>
    [MethodImpl(MethodImplOptions.NoInlining)]
    private static Vector128<int> PartialBlockVbmi512<TW, TM>(in BitplaneOperand w, uint* planes, byte* u, sbyte* x, byte* xa, sbyte* xs, int xStride, byte* tail)
        where TW : struct, IWidth where TM : struct, ITokenCount
    {
        byte* bytes = tail + 256;
        DecodePartialBlockVbmi512<TW>(w, planes, u, bytes, tail);
        Span<int> sums = stackalloc int[4];
        for (int t = 0; t < TM.Count; t++, x += xStride, xa += xStride, xs += xStride)
        {
            Vector256<int> p0 = default, p1 = default;
            Vector512<int> q = default;
            for (int j = 0; j < (w.Cols & 255); j += 64) Products512(ref p0, ref p1, ref q, Vector512.Load(bytes + j), x + j, xa + j, xs + j);
            sums[t] = TableBytes.Offset ? Vector256.Sum(p0 + p1) : Vector512.Sum(q);
        }
        return Vector128.Create(sums[0], sums[1], sums[2], sums[3]);
    }

}
