using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace AnyPrecML.Kernels;

// The int8 level on AVX2 (no AVX-512, VBMI or GFNI needed). A block is 256 columns: 8 words of each plane, one
// 32-byte load per plane. In Slice256 order, slice k of the block is bit k of every plane byte, so a slice's codes
// come from b shifts, ands and ors, and never leave their byte. Codes index the row's 7-bit table with vpshufb
// (16 entries per shuffle; wider tables by a tree of vpblendvb on the code's upper bits), and the looked-up bytes
// meet x8 in vpmaddubsw + vpmaddwd (vpdpbusd with AVX-VNNI).
//  - b ≤ 4: two slices share a byte (slice k in the low nibble, slice k+4 in the high one): one shift and one and
//    per plane give 64 codes; ~9 vector ops per 64 weights at b = 3 besides the products.
//  - b ≥ 5: the low nibble of the code from the last four planes, two slices per byte as for b = 4; vpshufb looks it up
//    in each 16-entry sub-table and vpblendvb picks among them on the upper code bits, read from planes 0..b-5 by one
//    shift each (4096×4096, one token, one thread, AVX2 + AVX-VNNI: b = 6 1.3 ms, b = 8 3.1 ms, from 2.2 and 4.8 when
//    every slice's b bits were assembled first).
//  - With AVX-VNNI the tables are read offset by 128 and vpdpbusd takes x8 as it is (TableBytes below).
//  - M > 1 (prefill, scoring): a group of rows is decoded to bytes once and every token tile of 4 reuses it, two
//    rows at a time, so the per-weight decode cost is paid once per 4·k tokens.
public static unsafe partial class BitplaneKernels
{
    private interface IWidth { static abstract int Bits { get; } }
    private struct Width2 : IWidth { public static int Bits => 2; }
    private struct Width3 : IWidth { public static int Bits => 3; }
    private struct Width4 : IWidth { public static int Bits => 4; }
    private struct Width5 : IWidth { public static int Bits => 5; }
    private struct Width6 : IWidth { public static int Bits => 6; }
    private struct Width7 : IWidth { public static int Bits => 7; }
    private struct Width8 : IWidth { public static int Bits => 8; }

    /// <summary>Rows decoded together for M &gt; 1: their bytes stay in L2 while every token tile passes over them.</summary>
    private const int Int8RowGroup = 16;

    /// <summary>Int8 rows on AVX2: y[t, r] = Σ_j U[r, c_j]·x8[t, j] (the caller rescales); x8 in Slice256 order.</summary>
    private static void RowsInt8Avx2(in BitplaneOperand w, byte* u, sbyte* x8, byte* xAbs, int* xSum, int xStride, int m, float* y, int rowStart, int rowEnd, byte* scratch)
    {
        switch (w.Bits)
        {
            case 2: RowsInt8Avx2<Width2>(w, u, x8, xAbs, xSum, xStride, m, y, rowStart, rowEnd, scratch); break;
            case 3: RowsInt8Avx2<Width3>(w, u, x8, xAbs, xSum, xStride, m, y, rowStart, rowEnd, scratch); break;
            case 4: RowsInt8Avx2<Width4>(w, u, x8, xAbs, xSum, xStride, m, y, rowStart, rowEnd, scratch); break;
            case 5: RowsInt8Avx2<Width5>(w, u, x8, xAbs, xSum, xStride, m, y, rowStart, rowEnd, scratch); break;
            case 6: RowsInt8Avx2<Width6>(w, u, x8, xAbs, xSum, xStride, m, y, rowStart, rowEnd, scratch); break;
            case 7: RowsInt8Avx2<Width7>(w, u, x8, xAbs, xSum, xStride, m, y, rowStart, rowEnd, scratch); break;
            default: RowsInt8Avx2<Width8>(w, u, x8, xAbs, xSum, xStride, m, y, rowStart, rowEnd, scratch); break;
        }
    }

    private static void RowsInt8Avx2<TW>(in BitplaneOperand w, byte* u0, sbyte* x8, byte* xAbs, int* xSum, int xStride, int m, float* y, int rowStart, int rowEnd, byte* scratch)
        where TW : struct, IWidth
    {
        int k = 1 << TW.Bits, blocks = xStride >> 8;
        byte* tail = scratch; // b planes × 32 bytes: the last, partial block's words, zero-padded
        if (m == 1)
        {
            int offset = TableBytes.Offset ? 128 * xSum[0] : 0;
            for (int r = rowStart; r < rowEnd; r++)
                y[r] = DotInt8Avx2<TW>(w, w.Planes + (long)r * w.Words, u0 + (long)r * k, x8, xAbs, blocks, tail) - offset;
            return;
        }
        byte* decoded = scratch + 256; // Int8RowGroup rows × xStride bytes
        for (int g = rowStart; g < rowEnd; g += Int8RowGroup)
        {
            int rows = Math.Min(Int8RowGroup, rowEnd - g);
            for (int i = 0; i < rows; i++)
                DecodeInt8Avx2<TW>(w, w.Planes + (long)(g + i) * w.Words, u0 + (long)(g + i) * k, decoded + (long)i * xStride, blocks, tail);
            TileInt8Avx2<TableBytes>(decoded, rows, xStride, x8, xAbs, xSum, m, y + g, w.Rows);
        }
    }

    /// <summary>Plane p's bytes for block <paramref name="block"/>: in place, or copied zero-padded when the block is partial.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static byte* BlockPlanes(in BitplaneOperand w, uint* planes, int block, int bits, byte* tail, out long stride)
    {
        int words = w.Words - 8 * block;
        if (words >= 8) { stride = w.PlaneStride * 4; return (byte*)(planes + 8 * block); }
        new Span<byte>(tail, 32 * bits).Clear();
        for (int p = 0; p < bits; p++)
            new ReadOnlySpan<uint>(planes + p * w.PlaneStride + 8 * block, words).CopyTo(new Span<uint>(tail + 32 * p, words));
        stride = 32;
        return tail;
    }

    /// <summary>Bit <paramref name="k"/> of every byte of <paramref name="plane"/> moved to bit <paramref name="to"/> (and, with a nibble mask, bit k+4 to to+4).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<byte> Place(Vector256<byte> plane, int k, int to, byte mask)
    {
        var v = plane.AsUInt16(); // 16-bit shifts: the and keeps only bits that stayed inside their byte
        if (k > to) v >>= k - to; else if (k < to) v <<= to - k;
        return v.AsByte() & Vector256.Create(mask);
    }

    /// <summary>Codes of slice k (low nibble) and slice k+4 (high nibble), b ≤ 4.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<byte> NibbleCodes<TW>(Vector256<byte> p0, Vector256<byte> p1, Vector256<byte> p2, Vector256<byte> p3, int k) where TW : struct, IWidth
    {
        int b = TW.Bits;
        var v = Place(p0, k, b - 1, (byte)(0x11 << (b - 1)));
        v |= Place(p1, k, b - 2, (byte)(0x11 << (b - 2)));
        if (b > 2) v |= Place(p2, k, b - 3, (byte)(0x11 << (b - 3)));
        if (b > 3) v |= Place(p3, k, 0, 0x11);
        return v;
    }

    /// <summary>The b ≤ 4 planes of a block (absent ones zero).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static (Vector256<byte>, Vector256<byte>, Vector256<byte>, Vector256<byte>) LowPlanes<TW>(byte* src, long stride) where TW : struct, IWidth =>
        (Vector256.Load(src), Vector256.Load(src + stride),
         TW.Bits > 2 ? Vector256.Load(src + 2 * stride) : default, TW.Bits > 3 ? Vector256.Load(src + 3 * stride) : default);

    /// <summary>The low (slice k) and high (slice k+4) nibbles as vpshufb indices: bit 7 must be clear.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static (Vector256<byte> Low, Vector256<byte> High) SplitNibbles<TW>(Vector256<byte> codes) where TW : struct, IWidth
    {
        var high = (codes.AsUInt16() >> 4).AsByte();
        // b ≤ 3: bit 3 of every code is 0, so bit 7 is clear in both without masking (vpshufb ignores bits 4..6).
        return TW.Bits == 4 ? (codes & Vector256.Create((byte)0x0F), high & Vector256.Create((byte)0x0F)) : (codes, high);
    }

    /// <summary>
    /// b ≥ 5, slices k and k+4 (k a loop variable, 0..3): the codes' low nibbles from the last four planes, two slices
    /// per byte as for b = 4 (slice k low, slice k+4 high). The upper code bits stay in planes 0..b-5 and only steer the
    /// blend tree (<see cref="LookupTree{TW}"/>): about half the vector ops of assembling all b bits of every slice.
    /// Slices run in a loop: eight copies of a 16-way blend tree exceed the JIT's inlining budget.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static (Vector256<byte> Low, Vector256<byte> High) WideNibbles(byte* src, long stride, int b, int k)
    {
        byte* low = src + (b - 4) * stride;
        var pair = Vector256.Create((byte)0x11); // bits k and k+4 after the shift; the and drops what crossed bytes
        var v = (((Vector256.Load(low).AsUInt16() >>> k).AsByte() & pair).AsUInt16() << 3).AsByte();
        v |= (((Vector256.Load(low + stride).AsUInt16() >>> k).AsByte() & pair).AsUInt16() << 2).AsByte();
        v |= (((Vector256.Load(low + 2 * stride).AsUInt16() >>> k).AsByte() & pair).AsUInt16() << 1).AsByte();
        v |= (Vector256.Load(low + 3 * stride).AsUInt16() >>> k).AsByte() & pair;
        var nibble = Vector256.Create((byte)0x0F);
        return (v & nibble, (v.AsUInt16() >>> 4).AsByte() & nibble);
    }

    /// <summary>
    /// Table bytes for b ≥ 5 codes: a vpshufb of the low nibble per 16-entry sub-table, then vpblendvb on code bits
    /// 4, 5, 6, 7, read straight from planes b-5, b-6, b-7, b-8: shifting a plane left by <paramref name="shift"/> puts
    /// the slice's bit at bit 7 of its byte, the one vpblendvb reads.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<byte> LookupTree<TW>(byte* u, Vector256<byte> index, byte* src, long stride, int shift) where TW : struct, IWidth
    {
        int b = TW.Bits;
        var bit4 = (Vector256.Load(src + (b - 5) * stride).AsUInt16() << shift).AsByte();
        if (b == 5) return Avx2.BlendVariable(SubTable(u, 0, index), SubTable(u, 1, index), bit4);
        var bit5 = (Vector256.Load(src + (b - 6) * stride).AsUInt16() << shift).AsByte();
        if (b == 6) return Avx2.BlendVariable(Pick32(u, 0, index, bit4), Pick32(u, 1, index, bit4), bit5);
        var bit6 = (Vector256.Load(src + (b - 7) * stride).AsUInt16() << shift).AsByte();
        if (b == 7) return Avx2.BlendVariable(Pick64(u, 0, index, bit4, bit5), Pick64(u, 1, index, bit4, bit5), bit6);
        var bit7 = (Vector256.Load(src).AsUInt16() << shift).AsByte();
        return Avx2.BlendVariable(
            Avx2.BlendVariable(Pick64(u, 0, index, bit4, bit5), Pick64(u, 1, index, bit4, bit5), bit6),
            Avx2.BlendVariable(Pick64(u, 2, index, bit4, bit5), Pick64(u, 3, index, bit4, bit5), bit6), bit7);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<byte> SubTable(byte* u, int h, Vector256<byte> index) => Avx2.Shuffle(Avx2.BroadcastVector128ToVector256(u + 16 * h), index);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<byte> Pick32(byte* u, int h, Vector256<byte> index, Vector256<byte> bit4) =>
        Avx2.BlendVariable(SubTable(u, 2 * h, index), SubTable(u, 2 * h + 1, index), bit4);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<byte> Pick64(byte* u, int h, Vector256<byte> index, Vector256<byte> bit4, Vector256<byte> bit5) =>
        Avx2.BlendVariable(Pick32(u, 2 * h, index, bit4), Pick32(u, 2 * h + 1, index, bit4), bit5);

    /// <summary>How a kernel's weight bytes meet x8: signed (|x|·(v·sign x)) or offset by 128 (vpdpbusd on x8 as it is).</summary>
    private interface IWeightBytes { static abstract bool Offset { get; } }

    /// <summary>Signed bytes (the dense int8 head): always |x|·(v·sign x).</summary>
    private struct SignedBytes : IWeightBytes { public static bool Offset => false; }

    /// <summary>
    /// Table bytes (the bitplane kernels). With AVX-VNNI the tables are read offset by 128 (<see cref="Int8Tables.U"/> =
    /// V + 128, unsigned): vpdpbusd multiplies them with x8 as it is, with no vpsignb and no |x| load (per 32 weights
    /// one op and one load fewer; in the 2×4 tiles half the ops), and Σ U·x8 = Σ V·x8 + 128·Σ x8 is corrected in
    /// integers before the float, so the result is the same integer. Without VNNI (Zen 2/3) vpmaddubsw would saturate
    /// pairs of 255·127, so the signed form stays.
    /// </summary>
    private struct TableBytes : IWeightBytes { public static bool Offset => OffsetTables; }

    /// <summary>True when the AVX2 int8 kernels read the tables offset by 128 (<see cref="TableBytes"/>), and so never |x8|.</summary>
    internal static bool OffsetTables => AvxVnni.IsSupported;

    /// <summary>acc += Σ of each 4 adjacent products of a weight vector with x8 (at <paramref name="x"/>; |x8| at <paramref name="xa"/>), in <typeparamref name="TB"/>'s form.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<int> WeightMultiplyAdd<TB>(Vector256<int> acc, Vector256<byte> v, sbyte* x, byte* xa) where TB : struct, IWeightBytes =>
        TB.Offset ? AvxVnni.MultiplyWideningAndAdd(acc, v, Vector256.Load(x)) : MultiplyAdd(acc, v, Vector256.Load(x), Vector256.Load(xa));

    /// <summary>
    /// acc += Σ of each 4 adjacent products v·x, as |x|·(v·sign x): an unsigned and a signed byte, as vpmaddubsw and
    /// vpdpbusd want; |v|, |x| ≤ 127 so a pair sum cannot saturate.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<int> MultiplyAdd(Vector256<int> acc, Vector256<byte> v, Vector256<sbyte> x, Vector256<byte> xAbs)
    {
        var signed = Avx2.Sign(v.AsSByte(), x);
        return AvxVnni.IsSupported ? AvxVnni.MultiplyWideningAndAdd(acc, xAbs, signed)
            : acc + Avx2.MultiplyAddAdjacent(Avx2.MultiplyAddAdjacent(xAbs, signed), Vector256.Create((short)1));
    }

    /// <summary>One row against one token (decode).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static int DotInt8Avx2<TW>(in BitplaneOperand w, uint* planes, byte* u, sbyte* x, byte* xa, int blocks, byte* tail) where TW : struct, IWidth =>
        // One method per kind of code keeps each loop small enough for the JIT to inline every helper in it.
        TW.Bits <= 4 ? DotNarrowInt8Avx2<TW>(w, planes, u, x, xa, blocks, tail) : DotWideInt8Avx2<TW>(w, planes, u, x, xa, blocks, tail);

    /// <summary>
    /// b ≤ 4: two slices per byte, one vpshufb of the row's 16-entry table each. The products are written out here
    /// rather than through <see cref="WeightMultiplyAdd{TB}"/>: with that pointer-taking helper the loop ran at 1.38
    /// instead of 0.75 ms per 4096×4096 product at b = 4 without VNNI (one thread).
    /// </summary>
    [SkipLocalsInit]
    private static int DotNarrowInt8Avx2<TW>(in BitplaneOperand w, uint* planes, byte* u, sbyte* x, byte* xa, int blocks, byte* tail) where TW : struct, IWidth
    {
        int b = TW.Bits;
        var acc0 = Vector256<int>.Zero;
        var acc1 = Vector256<int>.Zero;
        var acc2 = Vector256<int>.Zero;
        var acc3 = Vector256<int>.Zero;
        var table = Avx2.BroadcastVector128ToVector256(u);
        for (int block = 0; block < blocks; block++, x += 256, xa += 256)
        {
            byte* src = BlockPlanes(w, planes, block, b, tail, out long stride);
            var (p0, p1, p2, p3) = LowPlanes<TW>(src, stride);
            var (l0, h0) = SplitNibbles<TW>(NibbleCodes<TW>(p0, p1, p2, p3, 0));
            acc0 = (TableBytes.Offset ? AvxVnni.MultiplyWideningAndAdd(acc0, Avx2.Shuffle(table, l0), Vector256.Load(x)) : MultiplyAdd(acc0, Avx2.Shuffle(table, l0), Vector256.Load(x), Vector256.Load(xa)));
            acc1 = (TableBytes.Offset ? AvxVnni.MultiplyWideningAndAdd(acc1, Avx2.Shuffle(table, h0), Vector256.Load(x + 128)) : MultiplyAdd(acc1, Avx2.Shuffle(table, h0), Vector256.Load(x + 128), Vector256.Load(xa + 128)));
            var (l1, h1) = SplitNibbles<TW>(NibbleCodes<TW>(p0, p1, p2, p3, 1));
            acc2 = (TableBytes.Offset ? AvxVnni.MultiplyWideningAndAdd(acc2, Avx2.Shuffle(table, l1), Vector256.Load(x + 32)) : MultiplyAdd(acc2, Avx2.Shuffle(table, l1), Vector256.Load(x + 32), Vector256.Load(xa + 32)));
            acc3 = (TableBytes.Offset ? AvxVnni.MultiplyWideningAndAdd(acc3, Avx2.Shuffle(table, h1), Vector256.Load(x + 160)) : MultiplyAdd(acc3, Avx2.Shuffle(table, h1), Vector256.Load(x + 160), Vector256.Load(xa + 160)));
            var (l2, h2) = SplitNibbles<TW>(NibbleCodes<TW>(p0, p1, p2, p3, 2));
            acc0 = (TableBytes.Offset ? AvxVnni.MultiplyWideningAndAdd(acc0, Avx2.Shuffle(table, l2), Vector256.Load(x + 64)) : MultiplyAdd(acc0, Avx2.Shuffle(table, l2), Vector256.Load(x + 64), Vector256.Load(xa + 64)));
            acc1 = (TableBytes.Offset ? AvxVnni.MultiplyWideningAndAdd(acc1, Avx2.Shuffle(table, h2), Vector256.Load(x + 192)) : MultiplyAdd(acc1, Avx2.Shuffle(table, h2), Vector256.Load(x + 192), Vector256.Load(xa + 192)));
            var (l3, h3) = SplitNibbles<TW>(NibbleCodes<TW>(p0, p1, p2, p3, 3));
            acc2 = (TableBytes.Offset ? AvxVnni.MultiplyWideningAndAdd(acc2, Avx2.Shuffle(table, l3), Vector256.Load(x + 96)) : MultiplyAdd(acc2, Avx2.Shuffle(table, l3), Vector256.Load(x + 96), Vector256.Load(xa + 96)));
            acc3 = (TableBytes.Offset ? AvxVnni.MultiplyWideningAndAdd(acc3, Avx2.Shuffle(table, h3), Vector256.Load(x + 224)) : MultiplyAdd(acc3, Avx2.Shuffle(table, h3), Vector256.Load(x + 224), Vector256.Load(xa + 224)));
        }
        return Vector256.Sum((acc0 + acc1) + (acc2 + acc3));
    }

    /// <summary>b ≥ 5: the low nibble looked up in every sub-table, the upper code bits picking among them.</summary>
    [SkipLocalsInit]
    private static int DotWideInt8Avx2<TW>(in BitplaneOperand w, uint* planes, byte* u, sbyte* x, byte* xa, int blocks, byte* tail) where TW : struct, IWidth
    {
        int b = TW.Bits;
        var acc0 = Vector256<int>.Zero;
        var acc1 = Vector256<int>.Zero;
        for (int block = 0; block < blocks; block++, x += 256, xa += 256)
        {
            byte* src = BlockPlanes(w, planes, block, b, tail, out long stride);
            for (int k = 0; k < 4; k++)
            {
                var (lo, hi) = WideNibbles(src, stride, b, k);
                acc0 = WeightMultiplyAdd<TableBytes>(acc0, LookupTree<TW>(u, lo, src, stride, 7 - k), x + 32 * k, xa + 32 * k);
                acc1 = WeightMultiplyAdd<TableBytes>(acc1, LookupTree<TW>(u, hi, src, stride, 3 - k), x + 32 * k + 128, xa + 32 * k + 128);
            }
        }
        return Vector256.Sum(acc0 + acc1);
    }

    /// <summary>One row's table bytes in Slice256 order (zeros past the last column do not matter: x8 is zero there).</summary>
    [SkipLocalsInit]
    private static void DecodeInt8Avx2<TW>(in BitplaneOperand w, uint* planes, byte* u, byte* dst, int blocks, byte* tail) where TW : struct, IWidth
    {
        int b = TW.Bits;
        var table = Avx2.BroadcastVector128ToVector256(u);
        for (int block = 0; block < blocks; block++, dst += 256)
        {
            byte* src = BlockPlanes(w, planes, block, b, tail, out long stride);
            if (b <= 4)
            {
                var (p0, p1, p2, p3) = LowPlanes<TW>(src, stride);
                var (l0, h0) = SplitNibbles<TW>(NibbleCodes<TW>(p0, p1, p2, p3, 0));
                Avx2.Shuffle(table, l0).Store(dst); Avx2.Shuffle(table, h0).Store(dst + 128);
                var (l1, h1) = SplitNibbles<TW>(NibbleCodes<TW>(p0, p1, p2, p3, 1));
                Avx2.Shuffle(table, l1).Store(dst + 32); Avx2.Shuffle(table, h1).Store(dst + 160);
                var (l2, h2) = SplitNibbles<TW>(NibbleCodes<TW>(p0, p1, p2, p3, 2));
                Avx2.Shuffle(table, l2).Store(dst + 64); Avx2.Shuffle(table, h2).Store(dst + 192);
                var (l3, h3) = SplitNibbles<TW>(NibbleCodes<TW>(p0, p1, p2, p3, 3));
                Avx2.Shuffle(table, l3).Store(dst + 96); Avx2.Shuffle(table, h3).Store(dst + 224);
            }
            else
            {
                for (int k = 0; k < 4; k++)
                {
                    var (lo, hi) = WideNibbles(src, stride, b, k);
                    LookupTree<TW>(u, lo, src, stride, 7 - k).Store(dst + 32 * k);
                    LookupTree<TW>(u, hi, src, stride, 3 - k).Store(dst + 32 * k + 128);
                }
            }
        }
    }

    /// <summary>
    /// y[t, r] = Σ_j d[r, j]·x8[t, j] for decoded rows d (<paramref name="rows"/> × <paramref name="stride"/> bytes, in
    /// <typeparamref name="TB"/>'s form; offset bytes are corrected by 128·xSum[t]): tiles of 2 rows × 4 tokens keep eight
    /// accumulators in registers and load each byte once per tile.
    /// </summary>
    private static void TileInt8Avx2<TB>(byte* d, int rows, int stride, sbyte* x8, byte* xAbs, int* xSum, int m, float* y, int yStride) where TB : struct, IWeightBytes
    {
        int r = 0;
        for (; r + 2 <= rows; r += 2)
        {
            byte* d0 = d + (long)r * stride, d1 = d0 + stride;
            int t = 0;
            for (; t + 4 <= m; t += 4)
            {
                sbyte* x0 = x8 + (long)t * stride, x1 = x0 + stride, x2 = x1 + stride, x3 = x2 + stride;
                byte* z0 = xAbs + (long)t * stride, z1 = z0 + stride, z2 = z1 + stride, z3 = z2 + stride;
                Vector256<int> a00 = default, a01 = default, a02 = default, a03 = default, a10 = default, a11 = default, a12 = default, a13 = default;
                for (int j = 0; j < stride; j += 32)
                {
                    var w0 = Vector256.Load(d0 + j);
                    var w1 = Vector256.Load(d1 + j);
                    a00 = WeightMultiplyAdd<TB>(a00, w0, x0 + j, z0 + j); a10 = WeightMultiplyAdd<TB>(a10, w1, x0 + j, z0 + j);
                    a01 = WeightMultiplyAdd<TB>(a01, w0, x1 + j, z1 + j); a11 = WeightMultiplyAdd<TB>(a11, w1, x1 + j, z1 + j);
                    a02 = WeightMultiplyAdd<TB>(a02, w0, x2 + j, z2 + j); a12 = WeightMultiplyAdd<TB>(a12, w1, x2 + j, z2 + j);
                    a03 = WeightMultiplyAdd<TB>(a03, w0, x3 + j, z3 + j); a13 = WeightMultiplyAdd<TB>(a13, w1, x3 + j, z3 + j);
                }
                float* yt = y + (long)t * yStride + r;
                yt[0] = Vector256.Sum(a00) - Offset<TB>(xSum, t); yt[1] = Vector256.Sum(a10) - Offset<TB>(xSum, t); yt += yStride;
                yt[0] = Vector256.Sum(a01) - Offset<TB>(xSum, t + 1); yt[1] = Vector256.Sum(a11) - Offset<TB>(xSum, t + 1); yt += yStride;
                yt[0] = Vector256.Sum(a02) - Offset<TB>(xSum, t + 2); yt[1] = Vector256.Sum(a12) - Offset<TB>(xSum, t + 2); yt += yStride;
                yt[0] = Vector256.Sum(a03) - Offset<TB>(xSum, t + 3); yt[1] = Vector256.Sum(a13) - Offset<TB>(xSum, t + 3);
            }
            for (; t < m; t++)
            {
                y[(long)t * yStride + r] = DotBytesAvx2<TB>(d0, x8 + (long)t * stride, xAbs + (long)t * stride, stride) - Offset<TB>(xSum, t);
                y[(long)t * yStride + r + 1] = DotBytesAvx2<TB>(d1, x8 + (long)t * stride, xAbs + (long)t * stride, stride) - Offset<TB>(xSum, t);
            }
        }
        for (; r < rows; r++)
            for (int t = 0; t < m; t++) y[(long)t * yStride + r] = DotBytesAvx2<TB>(d + (long)r * stride, x8 + (long)t * stride, xAbs + (long)t * stride, stride) - Offset<TB>(xSum, t);
    }

    /// <summary>What offset bytes add to token t's sum: 128·Σ x8 (0 for signed bytes).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static int Offset<TB>(int* xSum, int t) where TB : struct, IWeightBytes => TB.Offset ? 128 * xSum[t] : 0;

    private static int DotBytesAvx2<TB>(byte* d, sbyte* x, byte* xa, int n) where TB : struct, IWeightBytes
    {
        var acc = Vector256<int>.Zero;
        for (int j = 0; j < n; j += 32) acc = WeightMultiplyAdd<TB>(acc, Vector256.Load(d + j), x + j, xa + j);
        return Vector256.Sum(acc);
    }
}
