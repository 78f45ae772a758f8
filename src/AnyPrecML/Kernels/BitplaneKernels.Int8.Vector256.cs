using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace AnyPrecML.Kernels;

// The int8 level on AVX2 (no AVX-512, VBMI or GFNI needed). A block is 256 columns: 8 words of each plane, one
// 32-byte load per plane. In Slice256 order, slice k of the block is bit k of every plane byte, so a slice's codes
// come from b shifts, ands and ors, and never leave their byte. Codes index the row's 7-bit table with vpshufb
// (16 entries per shuffle; wider tables by a tree of vpblendvb on the code's upper bits), and the looked-up bytes
// meet x8 in vpmaddubsw + vpmaddwd (vpdpbusd with AVX-VNNI).
//  - Codes: two slices share a byte (slice k in the low nibble, slice k+4 in the high one). A 4×4 bit transpose inside
//    every nibble (four delta swaps) turns the planes of code bits 0..3 into the four nibble pairs of a block at once
//    (fewer ops than shifting each plane's bit into place, at every b: 512×4096 in cache, b = 2 / 3 −11% / −16%).
//  - b ≤ 4: one vpshufb of the row's 16-entry table per 32 codes.
//  - b ≥ 5: vpshufb of the low nibble in each 16-entry sub-table, vpblendvb picking among them on the upper code bits,
//    read straight from planes 0..b-5 (a shift puts a slice's bit at bit 7, the one vpblendvb reads). At b = 5, 6 the
//    sub-tables stay in registers and the shifts are constants (512×4096 in cache: b = 5 −32% per product; decode of the
//    1.1B shape b = 5 +65..85%, b = 6 +30%: docs/BENCHMARKS.md); b = 7, 8 loop over slices (a 16-way tree written
//    out eight times exceeds the JIT's inlining budget, and then runs 2-3× slower).
//  - With AVX-VNNI the tables are read offset by 128 and vpdpbusd takes x8 as it is (TableBytes below).
//  - M = 2-4 (batched decode, short verify passes), where FewTokensInRegisters says so: the same block loops multiply
//    each looked-up vector with every token's x8 while it is in a register (FewTokensSink), two accumulator chains a
//    token.
//  - Larger M (prefill, scoring, long verify passes): a group of rows is decoded to bytes once, by the same block loops
//    (a sink stores the bytes instead of multiplying them), and register tiles over every token reuse it (2 rows × 4
//    tokens; 4 rows × 2-5 tokens where AVX-512's 32 registers hold them: TileInt8Avx2), so the per-weight decode cost
//    is paid once per group of tokens.
//  - The loop methods here and in the 512-bit file are AggressiveOptimization: compiled fully optimized at their first
//    call, so a generation's first tokens (and a bench's first width) never run tier-0 kernel code.
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
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
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

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void RowsInt8Avx2<TW>(in BitplaneOperand w, byte* u0, sbyte* x8, byte* xAbs, int* xSum, int xStride, int m, float* y, int rowStart, int rowEnd, byte* scratch)
        where TW : struct, IWidth
    {
        int k = 1 << TW.Bits;
        byte* tail = scratch; // b planes × 32 bytes: the last, partial block's words, zero-padded
        // One token, and 2-4 where that is faster (FewTokensInRegisters): the products straight from the lookups.
        if (m == 1 || FewTokensInRegisters(KernelPath.Vector256, m, TW.Bits))
        {
            switch (m)
            {
                case 1: RowsTokensAvx2<TW, ProductSink>(w, u0, x8, xAbs, xSum, xStride, y, rowStart, rowEnd, tail); break;
                case 2: RowsTokensAvx2<TW, FewTokensSink<Tokens2>>(w, u0, x8, xAbs, xSum, xStride, y, rowStart, rowEnd, tail); break;
                case 3: RowsTokensAvx2<TW, FewTokensSink<Tokens3>>(w, u0, x8, xAbs, xSum, xStride, y, rowStart, rowEnd, tail); break;
                default: RowsTokensAvx2<TW, FewTokensSink<Tokens4>>(w, u0, x8, xAbs, xSum, xStride, y, rowStart, rowEnd, tail); break;
            }
            return;
        }
        // More tokens: a group of rows decoded to bytes once, then the register tiles over every token.
        byte* decoded = scratch + 256; // Int8RowGroup rows × xStride bytes
        for (int g = rowStart; g < rowEnd; g += Int8RowGroup)
        {
            int rows = Math.Min(Int8RowGroup, rowEnd - g);
            for (int i = 0; i < rows; i++)
            {
                byte* row = decoded + (long)i * xStride;
                RowInt8Avx2<TW, StoreSink>(w, w.Planes + (long)(g + i) * w.Words, u0 + (long)(g + i) * k, tail, row, row, 0, null);
            }
            TileInt8Avx2<TableBytes>(decoded, rows, xStride, x8, xAbs, xSum, m, y + g, w.Rows);
        }
    }

    /// <summary>1-4 tokens (<typeparamref name="TS"/>: <see cref="ProductSink"/> or <see cref="FewTokensSink{TM}"/>): every row's table bytes multiplied with each token's x8 as they are looked up.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void RowsTokensAvx2<TW, TS>(in BitplaneOperand w, byte* u0, sbyte* x8, byte* xAbs, int* xSum, int xStride, float* y, int rowStart, int rowEnd, byte* tail)
        where TW : struct, IWidth where TS : struct, ITableBytesSink
    {
        int k = 1 << TW.Bits, n = TS.Tokens;
        int* rest = stackalloc int[3];
        for (int r = rowStart; r < rowEnd; r++)
        {
            if (TW.Bits >= 5 && r + 1 < w.Rows) PrefetchRow(w, r + 1, TW.Bits);
            if (n > 1) rest[0] = rest[1] = rest[2] = 0;
            y[r] = RowInt8Avx2<TW, TS>(w, w.Planes + (long)r * w.Words, u0 + (long)r * k, tail, (byte*)x8, xAbs, xStride, rest) - Offset<TableBytes>(xSum, 0);
            if (n > 1) y[w.Rows + r] = rest[0] - Offset<TableBytes>(xSum, 1);
            if (n > 2) y[2L * w.Rows + r] = rest[1] - Offset<TableBytes>(xSum, 2);
            if (n > 3) y[3L * w.Rows + r] = rest[2] - Offset<TableBytes>(xSum, 3);
        }
    }

    /// <summary>
    /// Asks for row <paramref name="r"/>'s plane words ahead of its product. At b ≥ 5 an AVX2 row costs about as long as
    /// a DRAM access (a 2048-column row ~500 cycles at b = 6), and its b plane streams, each at its own address, outrun
    /// what the hardware prefetchers fetch on their own: whole decode passes of the 1.1B shape ran 8-9% faster at
    /// b = 6, 7 and 1-5% at b = 5, 8 with the next row asked for (Zen 5, AVX2 path, 2 threads). At b ≤ 4 it moved them by
    /// ±4% (rows are quicker and four streams are followed; b = 4 slower), and the 512-bit path gained nothing.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void PrefetchRow(in BitplaneOperand w, int r, int bits)
    {
        byte* row = (byte*)(w.Planes + (long)r * w.Words);
        long planeBytes = w.PlaneStride * 4;
        for (int p = 0; p < bits; p++, row += planeBytes) PrefetchLines(row, w.Words * 4L);
    }

    /// <summary>Asks for the cache lines of [<paramref name="start"/>, + <paramref name="bytes"/>) (a hint: never faults).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void PrefetchLines(byte* start, long bytes)
    {
        for (long o = 0; o < bytes; o += 64) Sse.Prefetch0(start + o);
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

    /// <summary>The low (slice k) and high (slice k+4) nibbles as vpshufb indices: bit 7 must be clear.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static (Vector256<byte> Low, Vector256<byte> High) SplitNibbles<TW>(Vector256<byte> codes) where TW : struct, IWidth
    {
        var high = (codes.AsUInt16() >> 4).AsByte();
        // b ≤ 3: bit 3 of every code is 0, so bit 7 is clear in both without masking (vpshufb ignores bits 4..6).
        return TW.Bits == 4 ? (codes & Vector256.Create((byte)0x0F), high & Vector256.Create((byte)0x0F)) : (codes, high);
    }

    /// <summary>
    /// The 4-bit codes of a whole block from four planes, two slices per byte: a 4×4 bit transpose inside every nibble
    /// (four delta swaps, 24 vector ops per 256 codes, against 56 for shifting each slice's bit into place). In:
    /// <paramref name="c0"/>..<paramref name="c3"/> the planes of code bits 0..3 (least significant first). Out: cK
    /// holds slice k's codes in its low nibbles and slice k+4's in its high ones.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void TransposeNibbles(ref Vector256<byte> c0, ref Vector256<byte> c1, ref Vector256<byte> c2, ref Vector256<byte> c3)
    {
        // Bit q of plane j's nibble is slice q's code bit j; the transpose makes bit j of nibble k code bit j of slice k.
        DeltaSwap(ref c0, ref c1, 1, 0x55);
        DeltaSwap(ref c2, ref c3, 1, 0x55);
        DeltaSwap(ref c0, ref c2, 2, 0x33);
        DeltaSwap(ref c1, ref c3, 2, 0x33);
    }

    /// <summary>Swaps the bits of <paramref name="a"/> at mask·2^s with those of <paramref name="b"/> at mask (16-bit shifts: the mask keeps bytes apart).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void DeltaSwap(ref Vector256<byte> a, ref Vector256<byte> b, int s, byte mask)
    {
        var t = ((a.AsUInt16() >>> s).AsByte() ^ b) & Vector256.Create(mask);
        b ^= t;
        a ^= (t.AsUInt16() << s).AsByte();
    }

    /// <summary>The four planes holding code bits 3..0 of a block (absent ones zero), as <see cref="TransposeNibbles"/> takes them, least significant first.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static (Vector256<byte>, Vector256<byte>, Vector256<byte>, Vector256<byte>) NibblePlanes(byte* src, long stride, int b)
    {
        // Code bit j (j < 4) comes from plane b-1-j.
        var c0 = Vector256.Load(src + (b - 1) * stride);
        var c1 = Vector256.Load(src + (b - 2) * stride);
        var c2 = b > 2 ? Vector256.Load(src + (b - 3) * stride) : default;
        var c3 = b > 3 ? Vector256.Load(src + (b - 4) * stride) : default;
        return (c0, c1, c2, c3);
    }

    /// <summary>
    /// Codes of slices k (low nibble) and k+4 (high nibble) for k = 0..3, by <see cref="TransposeNibbles"/> of the planes
    /// of code bits 0..3 (absent ones zero, which the JIT folds away; b ≥ 5: the upper bits stay in their planes for
    /// the lookup's blends).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static (Vector256<byte>, Vector256<byte>, Vector256<byte>, Vector256<byte>) BlockNibbles<TW>(byte* src, long stride) where TW : struct, IWidth
    {
        var (c0, c1, c2, c3) = NibblePlanes(src, stride, TW.Bits);
        TransposeNibbles(ref c0, ref c1, ref c2, ref c3);
        return (c0, c1, c2, c3);
    }

    /// <summary>
    /// Table bytes for b = 7, 8 codes (b = 5, 6 have Lookup56): a vpshufb of the low nibble per 16-entry sub-table, then vpblendvb on code bits
    /// 4, 5, 6, 7, read straight from planes b-5, b-6, b-7, b-8: shifting a plane left by <paramref name="shift"/> puts
    /// the slice's bit at bit 7 of its byte, the one vpblendvb reads.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<byte> LookupTree<TW>(byte* u, Vector256<byte> index, byte* src, long stride, int shift) where TW : struct, IWidth
    {
        int b = TW.Bits;
        var bit4 = (Vector256.Load(src + (b - 5) * stride).AsUInt16() << shift).AsByte();
        var bit5 = (Vector256.Load(src + (b - 6) * stride).AsUInt16() << shift).AsByte();
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

    /// <summary>
    /// Where a row's table bytes go, 32 at a time: into products with x8 (1-4 tokens, <c>xStride</c> apart), or stored
    /// (more tokens). <c>p</c> is token 0's x8 (or the destination) at the bytes' offset, <c>pa</c> |x8| there; <c>a</c>
    /// is token 0's accumulator, <c>b</c>, <c>c</c>, <c>d</c> tokens 1-3's. Static, so that the block loops keep
    /// their accumulators as plain locals (a sink struct holding them was not enregistered: M = 1 ran 1.3-1.8× slower).
    /// </summary>
    private interface ITableBytesSink
    {
        static abstract void Take(ref Vector256<int> a, ref Vector256<int> b, ref Vector256<int> c, ref Vector256<int> d, Vector256<byte> v, byte* p, byte* pa, long xStride);

        /// <summary>Tokens multiplied (0 when stored). One token alone gets four accumulator chains; with more, each token gets two (and the block loops give token 0 only two).</summary>
        static abstract int Tokens { get; }
    }

    /// <summary>
    /// One token (decode): a += the table bytes times x8. Kept apart from <see cref="FewTokensSink{TM}"/>, whose larger
    /// body (dead for one token, but counted before it is folded) put the b = 7, 8 block loops over the JIT's inlining
    /// budget: Take and the blend tree were left as calls, and one token at b = 8 ran 1.7-2.1× slower on AVX2.
    /// </summary>
    private struct ProductSink : ITableBytesSink
    {
        public static int Tokens => 1;

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static void Take(ref Vector256<int> a, ref Vector256<int> b, ref Vector256<int> c, ref Vector256<int> d, Vector256<byte> v, byte* p, byte* pa, long xStride) =>
            a = WeightMultiplyAdd<TableBytes>(a, v, (sbyte*)p, pa);
    }

    /// <summary>
    /// Two to four tokens (batched decode, short verify passes): the table bytes times each token's x8 while they are in a
    /// register. Storing the rows and reading them back for register tiles cost more than the decode it saves at this M
    /// (<see cref="FewTokensInRegisters"/>).
    /// </summary>
    private struct FewTokensSink<TM> : ITableBytesSink where TM : struct, ITokenCount
    {
        public static int Tokens => TM.Count;

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static void Take(ref Vector256<int> a, ref Vector256<int> b, ref Vector256<int> c, ref Vector256<int> d, Vector256<byte> v, byte* p, byte* pa, long xStride)
        {
            a = WeightMultiplyAdd<TableBytes>(a, v, (sbyte*)p, pa);
            b = WeightMultiplyAdd<TableBytes>(b, v, (sbyte*)(p + xStride), pa + xStride);
            if (TM.Count > 2) c = WeightMultiplyAdd<TableBytes>(c, v, (sbyte*)(p + 2 * xStride), pa + 2 * xStride);
            if (TM.Count > 3) d = WeightMultiplyAdd<TableBytes>(d, v, (sbyte*)(p + 3 * xStride), pa + 3 * xStride);
        }
    }

    /// <summary>Several tokens: the table bytes stored in Slice256 order, for the register tiles (no accumulator is used).</summary>
    private struct StoreSink : ITableBytesSink
    {
        public static int Tokens => 0;

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static void Take(ref Vector256<int> a, ref Vector256<int> b, ref Vector256<int> c, ref Vector256<int> d, Vector256<byte> v, byte* p, byte* pa, long xStride) => v.Store(p);
    }

    /// <summary>
    /// One row's table bytes into <typeparamref name="TS"/>, block by block, <paramref name="p"/> and <paramref name="pa"/>
    /// advancing 256 bytes a block; returns token 0's sum of products (0 when stored) and adds tokens 1-3's to
    /// rest[0..2]. Whole blocks are read in place; a partial last one goes through <see cref="BlockPlanes"/>'s zero-padded
    /// copy and a second, one-block run of the loop (x8's zeros past the last column meet whatever its padding decodes to).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static int RowInt8Avx2<TW, TS>(in BitplaneOperand w, uint* planes, byte* u, byte* tail, byte* p, byte* pa, long xStride, int* rest)
        where TW : struct, IWidth where TS : struct, ITableBytesSink
    {
        int full = w.Cols >> 8;
        int sum = Blocks<TW, TS>((byte*)planes, w.PlaneStride * 4, u, full, p, pa, xStride, rest);
        if ((w.Cols & 255) != 0)
        {
            byte* src = BlockPlanes(w, planes, full, TW.Bits, tail, out long stride);
            sum += Blocks<TW, TS>(src, stride, u, 1, p + 256L * full, pa + 256L * full, xStride, rest);
        }
        return sum;
    }

    /// <summary>
    /// <paramref name="blocks"/> blocks from <paramref name="src"/> (planes <paramref name="stride"/> bytes apart). One loop
    /// method per kind of code keeps each loop small enough for the JIT to inline every helper in it, and no call may sit
    /// in or after a loop: every ymm register is caller-saved, and with the partial block's copy after the loop the JIT
    /// stored the four accumulators and the table to the stack and reloaded them on every block.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static int Blocks<TW, TS>(byte* src, long stride, byte* u, int blocks, byte* p, byte* pa, long xStride, int* rest) where TW : struct, IWidth where TS : struct, ITableBytesSink =>
        TW.Bits <= 4 ? NarrowBlocks<TW, TS>(src, stride, u, blocks, p, pa, xStride, rest)
        : TW.Bits <= 6 ? MidBlocks<TW, TS>(src, stride, u, blocks, p, pa, xStride, rest)
        : WideBlocks<TW, TS>(src, stride, u, blocks, p, pa, xStride, rest);

    /// <summary>
    /// Token 0's sum (its chains acc0..acc3; acc2, acc3 stay zero with several tokens), tokens 1-3's added to
    /// rest[0..2]. Token 0's comes back in a register: a returned Vector128 goes through memory on SysV, which cost one
    /// token 2-4% at b = 5, 6.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static int TokenSums<TS>(Vector256<int> acc0, Vector256<int> acc1, Vector256<int> acc2, Vector256<int> acc3,
        Vector256<int> b0, Vector256<int> b1, Vector256<int> c0, Vector256<int> c1, Vector256<int> d0, Vector256<int> d1, int* rest) where TS : struct, ITableBytesSink
    {
        if (TS.Tokens > 1) rest[0] += Vector256.Sum(b0 + b1);
        if (TS.Tokens > 2) rest[1] += Vector256.Sum(c0 + c1);
        if (TS.Tokens > 3) rest[2] += Vector256.Sum(d0 + d1);
        return Vector256.Sum((acc0 + acc1) + (acc2 + acc3));
    }

    /// <summary>b ≤ 4: two slices per byte, one vpshufb of the row's 16-entry table each.</summary>
    [SkipLocalsInit]
    [MethodImpl(MethodImplOptions.NoInlining | MethodImplOptions.AggressiveOptimization)]
    private static int NarrowBlocks<TW, TS>(byte* src, long stride, byte* u, int blocks, byte* p, byte* pa, long xStride, int* rest) where TW : struct, IWidth where TS : struct, ITableBytesSink
    {
        Vector256<int> acc0 = default, acc1 = default, acc2 = default, acc3 = default, b0 = default, b1 = default, c0 = default, c1 = default, d0 = default, d1 = default;
        var table = Avx2.BroadcastVector128ToVector256(u);
        for (int block = 0; block < blocks; block++, src += 32, p += 256, pa += 256)
        {
            if (TS.Tokens > 1) NarrowBlock<TW, TS>(src, stride, table, p, pa, ref acc0, ref acc1, ref acc0, ref acc1, ref b0, ref b1, ref c0, ref c1, ref d0, ref d1, xStride);
            else NarrowBlock<TW, TS>(src, stride, table, p, pa, ref acc0, ref acc1, ref acc2, ref acc3, ref b0, ref b1, ref c0, ref c1, ref d0, ref d1, xStride);
        }
        return TokenSums<TS>(acc0, acc1, acc2, acc3, b0, b1, c0, c1, d0, d1, rest);
    }

    /// <summary>One block of <see cref="NarrowBlocks{TW, TS}"/>: 256 table bytes.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void NarrowBlock<TW, TS>(byte* src, long stride, Vector256<byte> table, byte* p, byte* pa,
        ref Vector256<int> acc0, ref Vector256<int> acc1, ref Vector256<int> acc2, ref Vector256<int> acc3,
        ref Vector256<int> b0, ref Vector256<int> b1, ref Vector256<int> c0, ref Vector256<int> c1, ref Vector256<int> d0, ref Vector256<int> d1, long xStride) where TW : struct, IWidth where TS : struct, ITableBytesSink
    {
        var (n0, n1, n2, n3) = BlockNibbles<TW>(src, stride);
        var (l0, h0) = SplitNibbles<TW>(n0);
        TS.Take(ref acc0, ref b0, ref c0, ref d0, Avx2.Shuffle(table, l0), p, pa, xStride);
        TS.Take(ref acc1, ref b1, ref c1, ref d1, Avx2.Shuffle(table, h0), p + 128, pa + 128, xStride);
        var (l1, h1) = SplitNibbles<TW>(n1);
        TS.Take(ref acc2, ref b0, ref c0, ref d0, Avx2.Shuffle(table, l1), p + 32, pa + 32, xStride);
        TS.Take(ref acc3, ref b1, ref c1, ref d1, Avx2.Shuffle(table, h1), p + 160, pa + 160, xStride);
        var (l2, h2) = SplitNibbles<TW>(n2);
        TS.Take(ref acc0, ref b0, ref c0, ref d0, Avx2.Shuffle(table, l2), p + 64, pa + 64, xStride);
        TS.Take(ref acc1, ref b1, ref c1, ref d1, Avx2.Shuffle(table, h2), p + 192, pa + 192, xStride);
        var (l3, h3) = SplitNibbles<TW>(n3);
        TS.Take(ref acc2, ref b0, ref c0, ref d0, Avx2.Shuffle(table, l3), p + 96, pa + 96, xStride);
        TS.Take(ref acc3, ref b1, ref c1, ref d1, Avx2.Shuffle(table, h3), p + 224, pa + 224, xStride);
    }

    /// <summary>b = 5, 6: the two or four sub-tables in registers and every slice written out (constant shifts).</summary>
    [SkipLocalsInit]
    [MethodImpl(MethodImplOptions.NoInlining | MethodImplOptions.AggressiveOptimization)]
    private static int MidBlocks<TW, TS>(byte* src, long stride, byte* u, int blocks, byte* p, byte* pa, long xStride, int* rest) where TW : struct, IWidth where TS : struct, ITableBytesSink
    {
        Vector256<int> acc0 = default, acc1 = default, acc2 = default, acc3 = default, b0 = default, b1 = default, c0 = default, c1 = default, d0 = default, d1 = default;
        var t0 = Avx2.BroadcastVector128ToVector256(u);
        var t1 = Avx2.BroadcastVector128ToVector256(u + 16);
        var t2 = TW.Bits == 6 ? Avx2.BroadcastVector128ToVector256(u + 32) : default;
        var t3 = TW.Bits == 6 ? Avx2.BroadcastVector128ToVector256(u + 48) : default;
        // b = 6: two accumulators, not four. Its block is long enough (~110 ops) that two vpdpbusd chains never wait, and on
        // AVX2's 16 registers the four sub-tables, nibbles and upper planes then spill less (A/B −4%; b = 5 +2%, so it keeps four).
        for (int block = 0; block < blocks; block++, src += 32, p += 256, pa += 256)
        {
            if (TW.Bits == 6 || TS.Tokens > 1) MidBlock<TW, TS>(src, stride, t0, t1, t2, t3, p, pa, ref acc0, ref acc1, ref acc0, ref acc1, ref b0, ref b1, ref c0, ref c1, ref d0, ref d1, xStride);
            else MidBlock<TW, TS>(src, stride, t0, t1, t2, t3, p, pa, ref acc0, ref acc1, ref acc2, ref acc3, ref b0, ref b1, ref c0, ref c1, ref d0, ref d1, xStride);
        }
        return TokenSums<TS>(acc0, acc1, acc2, acc3, b0, b1, c0, c1, d0, d1, rest);
    }

    /// <summary>b = 7, 8: the low nibble looked up in every sub-table, the upper code bits picking among them.</summary>
    [SkipLocalsInit]
    [MethodImpl(MethodImplOptions.NoInlining | MethodImplOptions.AggressiveOptimization)]
    private static int WideBlocks<TW, TS>(byte* src, long stride, byte* u, int blocks, byte* p, byte* pa, long xStride, int* rest) where TW : struct, IWidth where TS : struct, ITableBytesSink
    {
        Vector256<int> acc0 = default, acc1 = default, acc2 = default, acc3 = default, b0 = default, b1 = default, c0 = default, c1 = default, d0 = default, d1 = default;
        for (int block = 0; block < blocks; block++, src += 32, p += 256, pa += 256)
        {
            if (TS.Tokens > 1) WideBlock<TW, TS>(src, stride, u, p, pa, ref acc0, ref acc1, ref acc0, ref acc1, ref b0, ref b1, ref c0, ref c1, ref d0, ref d1, xStride);
            else WideBlock<TW, TS>(src, stride, u, p, pa, ref acc0, ref acc1, ref acc2, ref acc3, ref b0, ref b1, ref c0, ref c1, ref d0, ref d1, xStride);
        }
        return TokenSums<TS>(acc0, acc1, acc2, acc3, b0, b1, c0, c1, d0, d1, rest);
    }

    /// <summary>One block at b = 5 or 6: the upper planes loaded once, each slice's bits moved to bit 7 by a constant shift.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void MidBlock<TW, TS>(byte* src, long stride, Vector256<byte> t0, Vector256<byte> t1, Vector256<byte> t2, Vector256<byte> t3, byte* p, byte* pa,
        ref Vector256<int> acc0, ref Vector256<int> acc1, ref Vector256<int> acc2, ref Vector256<int> acc3,
        ref Vector256<int> b0, ref Vector256<int> b1, ref Vector256<int> c0, ref Vector256<int> c1, ref Vector256<int> d0, ref Vector256<int> d1, long xStride)
        where TW : struct, IWidth where TS : struct, ITableBytesSink
    {
        var (n0, n1, n2, n3) = BlockNibbles<TW>(src, stride);
        var p4 = Vector256.Load(src + (TW.Bits - 5) * stride).AsUInt16();
        var p5 = TW.Bits == 6 ? Vector256.Load(src).AsUInt16() : default;
        var (l0, h0) = SplitNibbles<Width4>(n0);
        TS.Take(ref acc0, ref b0, ref c0, ref d0, Lookup56<TW>(l0, p4, p5, 7, t0, t1, t2, t3), p, pa, xStride);
        TS.Take(ref acc1, ref b1, ref c1, ref d1, Lookup56<TW>(h0, p4, p5, 3, t0, t1, t2, t3), p + 128, pa + 128, xStride);
        var (l1, h1) = SplitNibbles<Width4>(n1);
        TS.Take(ref acc2, ref b0, ref c0, ref d0, Lookup56<TW>(l1, p4, p5, 6, t0, t1, t2, t3), p + 32, pa + 32, xStride);
        TS.Take(ref acc3, ref b1, ref c1, ref d1, Lookup56<TW>(h1, p4, p5, 2, t0, t1, t2, t3), p + 160, pa + 160, xStride);
        var (l2, h2) = SplitNibbles<Width4>(n2);
        TS.Take(ref acc0, ref b0, ref c0, ref d0, Lookup56<TW>(l2, p4, p5, 5, t0, t1, t2, t3), p + 64, pa + 64, xStride);
        TS.Take(ref acc1, ref b1, ref c1, ref d1, Lookup56<TW>(h2, p4, p5, 1, t0, t1, t2, t3), p + 192, pa + 192, xStride);
        var (l3, h3) = SplitNibbles<Width4>(n3);
        TS.Take(ref acc2, ref b0, ref c0, ref d0, Lookup56<TW>(l3, p4, p5, 4, t0, t1, t2, t3), p + 96, pa + 96, xStride);
        TS.Take(ref acc3, ref b1, ref c1, ref d1, Lookup56<TW>(h3, p4, p5, 0, t0, t1, t2, t3), p + 224, pa + 224, xStride);
    }

    /// <summary>
    /// b = 5, 6: sub-table t(bit5·2 + bit4)[index], bit4 and bit5 read from bit 7 of each byte (vpblendvb's) once planes
    /// <paramref name="p4"/>, <paramref name="p5"/> are shifted left by <paramref name="shift"/>. The shifts are made
    /// here, each just before its blend: made at the call, both shifted planes were live across the first blends, and
    /// on AVX2's 16 registers the JIT stored and reloaded seven shuffle results a block at b = 6 (4096×4096, one token,
    /// 2 threads, Zen 4, AVX2 alone: b = 6 −17..−21% without them).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<byte> Lookup56<TW>(Vector256<byte> index, Vector256<ushort> p4, Vector256<ushort> p5, int shift,
        Vector256<byte> t0, Vector256<byte> t1, Vector256<byte> t2, Vector256<byte> t3) where TW : struct, IWidth
    {
        var bit4 = (p4 << shift).AsByte();
        var low = Avx2.BlendVariable(Avx2.Shuffle(t0, index), Avx2.Shuffle(t1, index), bit4);
        if (TW.Bits == 5) return low;
        var high = Avx2.BlendVariable(Avx2.Shuffle(t2, index), Avx2.Shuffle(t3, index), bit4);
        return Avx2.BlendVariable(low, high, (p5 << shift).AsByte());
    }

    /// <summary>
    /// One block of <see cref="WideBlocks{TW, TS}"/>. Slices run in a loop, two at a time: eight copies of a 16-way
    /// blend tree exceed the JIT's inlining budget.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void WideBlock<TW, TS>(byte* src, long stride, byte* u, byte* p, byte* pa,
        ref Vector256<int> acc0, ref Vector256<int> acc1, ref Vector256<int> acc2, ref Vector256<int> acc3,
        ref Vector256<int> b0, ref Vector256<int> b1, ref Vector256<int> c0, ref Vector256<int> c1, ref Vector256<int> d0, ref Vector256<int> d1, long xStride) where TW : struct, IWidth where TS : struct, ITableBytesSink
    {
        var (n0, n1, n2, n3) = BlockNibbles<TW>(src, stride);
        for (int k = 0; k < 4; k += 2)
        {
            var (lo, hi) = SplitNibbles<Width4>(k == 0 ? n0 : n2);
            TS.Take(ref acc0, ref b0, ref c0, ref d0, LookupTree<TW>(u, lo, src, stride, 7 - k), p + 32 * k, pa + 32 * k, xStride);
            TS.Take(ref acc1, ref b1, ref c1, ref d1, LookupTree<TW>(u, hi, src, stride, 3 - k), p + 32 * k + 128, pa + 32 * k + 128, xStride);
            (lo, hi) = SplitNibbles<Width4>(k == 0 ? n1 : n3);
            TS.Take(ref acc2, ref b0, ref c0, ref d0, LookupTree<TW>(u, lo, src, stride, 6 - k), p + 32 * k + 32, pa + 32 * k + 32, xStride);
            TS.Take(ref acc3, ref b1, ref c1, ref d1, LookupTree<TW>(u, hi, src, stride, 2 - k), p + 32 * k + 160, pa + 32 * k + 160, xStride);
        }
    }

    /// <summary>
    /// y[t, r] = Σ_j d[r, j]·x8[t, j] for decoded rows d (<paramref name="rows"/> × <paramref name="stride"/> bytes, in
    /// <typeparamref name="TB"/>'s form; offset bytes are corrected by 128·xSum[t]). With VNNI and AVX-512's 32 registers,
    /// tiles of 4 rows × 4 tokens, the last 2-5 tokens in one tile of their width (<see cref="FourRows{TT}"/>: 16-20
    /// vpdpbusd chains; against 2 × 4 tiles, 2048×5632 M = 2, 3, 5, 64: −19..−29%, −5%, −25%). Else (16 registers: a
    /// 4 × 4 tile spilled, +12..31%), and for the rows left, tiles of 2 rows × 4 tokens (8 accumulators; each byte loaded
    /// once per tile) and the last 1-3 tokens in a tile of their width (a verify pass of k = 4 drafts is M = 5: one token
    /// left over, which one accumulator chain per row made cost as much as the four before it).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void TileInt8Avx2<TB>(byte* d, int rows, int stride, sbyte* x8, byte* xAbs, int* xSum, int m, float* y, int yStride) where TB : struct, IWeightBytes
    {
        int r = 0;
        if (TB.Offset && Avx512F.VL.IsSupported)
            for (; r + 4 <= rows && m >= 2; r += 4)
            {
                byte* d0 = d + (long)r * stride;
                int t = 0;
                for (; m - t > 5; t += 4) FourRows<Tokens4>(d0, stride, x8, xSum, t, y + r, yStride);
                switch (m - t)
                {
                    case 5: FourRows<Tokens5>(d0, stride, x8, xSum, t, y + r, yStride); break;
                    case 4: FourRows<Tokens4>(d0, stride, x8, xSum, t, y + r, yStride); break;
                    case 3: FourRows<Tokens3>(d0, stride, x8, xSum, t, y + r, yStride); break;
                    case 2: FourRows<Tokens2>(d0, stride, x8, xSum, t, y + r, yStride); break;
                }
            }
        for (; r + 2 <= rows; r += 2)
        {
            byte* d0 = d + (long)r * stride;
            int t = 0;
            for (; t + 4 <= m; t += 4) TwoRows<TB, Tokens4>(d0, stride, x8, xAbs, xSum, t, y + r, yStride);
            LeftTokens<TB>(d0, stride, x8, xAbs, xSum, t, m, y + r, yStride);
        }
        for (; r < rows; r++)
            for (int t = 0; t < m; t++) y[(long)t * yStride + r] = DotBytesAvx2<TB>(d + (long)r * stride, x8 + (long)t * stride, xAbs + (long)t * stride, stride) - Offset<TB>(xSum, t);
    }

    /// <summary>Rows d0 and d0 + stride against tokens t..m−1 (0-3 of them): a tile of their width.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void LeftTokens<TB>(byte* d0, int stride, sbyte* x8, byte* xAbs, int* xSum, int t, int m, float* y, int yStride) where TB : struct, IWeightBytes
    {
        switch (m - t)
        {
            case 3: TwoRows<TB, Tokens3>(d0, stride, x8, xAbs, xSum, t, y, yStride); break;
            case 2: TwoRows<TB, Tokens2>(d0, stride, x8, xAbs, xSum, t, y, yStride); break;
            case 1: TwoRows<TB, Tokens1>(d0, stride, x8, xAbs, xSum, t, y, yStride); break;
        }
    }

    /// <summary>
    /// Offset table bytes (VNNI), AVX-512's 32 registers: rows d0..d0 + 3·stride against tokens t..t+<typeparamref name="TT"/>−1
    /// (2..5), one accumulator each (aRT), kept in registers. Five tokens in one tile: a verify pass of k = 4 drafts is M = 5.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void FourRows<TT>(byte* d0, int stride, sbyte* x8, int* xSum, int t, float* y, int yStride) where TT : struct, ITokenCount
    {
        int n = TT.Count;
        byte* d1 = d0 + stride, d2 = d1 + stride, d3 = d2 + stride;
        sbyte* x0 = x8 + (long)t * stride, x1 = x0 + stride, x2 = x1 + stride, x3 = x2 + stride, x4 = x3 + stride;
        Vector256<int> a00 = default, a01 = default, a02 = default, a03 = default, a04 = default, a10 = default, a11 = default, a12 = default, a13 = default, a14 = default;
        Vector256<int> a20 = default, a21 = default, a22 = default, a23 = default, a24 = default, a30 = default, a31 = default, a32 = default, a33 = default, a34 = default;
        for (int j = 0; j < stride; j += 32)
        {
            var w0 = Vector256.Load(d0 + j); var w1 = Vector256.Load(d1 + j); var w2 = Vector256.Load(d2 + j); var w3 = Vector256.Load(d3 + j);
            FourProducts(ref a00, ref a10, ref a20, ref a30, w0, w1, w2, w3, x0 + j);
            FourProducts(ref a01, ref a11, ref a21, ref a31, w0, w1, w2, w3, x1 + j);
            if (n > 2) FourProducts(ref a02, ref a12, ref a22, ref a32, w0, w1, w2, w3, x2 + j);
            if (n > 3) FourProducts(ref a03, ref a13, ref a23, ref a33, w0, w1, w2, w3, x3 + j);
            if (n > 4) FourProducts(ref a04, ref a14, ref a24, ref a34, w0, w1, w2, w3, x4 + j);
        }
        for (int i = 0; i < n; i++)
        {
            float* yt = y + (long)(t + i) * yStride;
            int offset = 128 * xSum[t + i];
            var (c0, c1, c2, c3) = i switch { 0 => (a00, a10, a20, a30), 1 => (a01, a11, a21, a31), 2 => (a02, a12, a22, a32), 3 => (a03, a13, a23, a33), _ => (a04, a14, a24, a34) };
            yt[0] = Vector256.Sum(c0) - offset; yt[1] = Vector256.Sum(c1) - offset; yt[2] = Vector256.Sum(c2) - offset; yt[3] = Vector256.Sum(c3) - offset;
        }
    }

    /// <summary>One token's 32 x8 bytes against four rows' weight vectors: loaded once, one vpdpbusd per row.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void FourProducts(ref Vector256<int> a0, ref Vector256<int> a1, ref Vector256<int> a2, ref Vector256<int> a3,
        Vector256<byte> w0, Vector256<byte> w1, Vector256<byte> w2, Vector256<byte> w3, sbyte* x)
    {
        var v = Vector256.Load(x);
        a0 = AvxVnni.MultiplyWideningAndAdd(a0, w0, v);
        a1 = AvxVnni.MultiplyWideningAndAdd(a1, w1, v);
        a2 = AvxVnni.MultiplyWideningAndAdd(a2, w2, v);
        a3 = AvxVnni.MultiplyWideningAndAdd(a3, w3, v);
    }

    private interface ITokenCount { static abstract int Count { get; } }
    private struct Tokens1 : ITokenCount { public static int Count => 1; }
    private struct Tokens2 : ITokenCount { public static int Count => 2; }
    private struct Tokens3 : ITokenCount { public static int Count => 3; }
    private struct Tokens4 : ITokenCount { public static int Count => 4; }
    private struct Tokens5 : ITokenCount { public static int Count => 5; }

    /// <summary>
    /// Rows d0 and d0 + stride against tokens t..t+<typeparamref name="TT"/>−1: one accumulator per (row, token), and with
    /// one or two tokens and VNNI a second set over alternate 32-byte steps, so that at least four independent vpdpbusd
    /// chains (its latency is 4-5 cycles) are in flight. Without VNNI the chain is a vpaddd and one set is faster
    /// (the second set cost 4-11% at M = 5 there).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void TwoRows<TB, TT>(byte* d0, int stride, sbyte* x8, byte* xAbs, int* xSum, int t, float* y, int yStride)
        where TB : struct, IWeightBytes where TT : struct, ITokenCount
    {
        int n = TT.Count;
        byte* d1 = d0 + stride;
        sbyte* x0 = x8 + (long)t * stride, x1 = x0 + stride, x2 = x1 + stride, x3 = x2 + stride;
        byte* z0 = xAbs + (long)t * stride, z1 = z0 + stride, z2 = z1 + stride, z3 = z2 + stride;
        Vector256<int> a00 = default, a01 = default, a02 = default, a03 = default, a10 = default, a11 = default, a12 = default, a13 = default;
        int j = 0;
        if (n <= 2 && AvxVnni.IsSupported)
        {
            // Two sets: (a00, a10, a01, a11) on even steps, (a02, a12, a03, a13) on odd ones, added at the end.
            for (; j + 64 <= stride; j += 64)
            {
                var w0 = Vector256.Load(d0 + j); var w1 = Vector256.Load(d1 + j);
                var v0 = Vector256.Load(d0 + j + 32); var v1 = Vector256.Load(d1 + j + 32);
                a00 = WeightMultiplyAdd<TB>(a00, w0, x0 + j, z0 + j); a10 = WeightMultiplyAdd<TB>(a10, w1, x0 + j, z0 + j);
                a02 = WeightMultiplyAdd<TB>(a02, v0, x0 + j + 32, z0 + j + 32); a12 = WeightMultiplyAdd<TB>(a12, v1, x0 + j + 32, z0 + j + 32);
                if (n == 2)
                {
                    a01 = WeightMultiplyAdd<TB>(a01, w0, x1 + j, z1 + j); a11 = WeightMultiplyAdd<TB>(a11, w1, x1 + j, z1 + j);
                    a03 = WeightMultiplyAdd<TB>(a03, v0, x1 + j + 32, z1 + j + 32); a13 = WeightMultiplyAdd<TB>(a13, v1, x1 + j + 32, z1 + j + 32);
                }
            }
            a00 += a02; a10 += a12; a01 += a03; a11 += a13;
            a02 = a12 = a03 = a13 = default;
        }
        for (; j < stride; j += 32)
        {
            var w0 = Vector256.Load(d0 + j); var w1 = Vector256.Load(d1 + j);
            a00 = WeightMultiplyAdd<TB>(a00, w0, x0 + j, z0 + j); a10 = WeightMultiplyAdd<TB>(a10, w1, x0 + j, z0 + j);
            if (n > 1) { a01 = WeightMultiplyAdd<TB>(a01, w0, x1 + j, z1 + j); a11 = WeightMultiplyAdd<TB>(a11, w1, x1 + j, z1 + j); }
            if (n > 2) { a02 = WeightMultiplyAdd<TB>(a02, w0, x2 + j, z2 + j); a12 = WeightMultiplyAdd<TB>(a12, w1, x2 + j, z2 + j); }
            if (n > 3) { a03 = WeightMultiplyAdd<TB>(a03, w0, x3 + j, z3 + j); a13 = WeightMultiplyAdd<TB>(a13, w1, x3 + j, z3 + j); }
        }
        float* yt = y + (long)t * yStride;
        yt[0] = Vector256.Sum(a00) - Offset<TB>(xSum, t); yt[1] = Vector256.Sum(a10) - Offset<TB>(xSum, t);
        if (n > 1) { yt += yStride; yt[0] = Vector256.Sum(a01) - Offset<TB>(xSum, t + 1); yt[1] = Vector256.Sum(a11) - Offset<TB>(xSum, t + 1); }
        if (n > 2) { yt += yStride; yt[0] = Vector256.Sum(a02) - Offset<TB>(xSum, t + 2); yt[1] = Vector256.Sum(a12) - Offset<TB>(xSum, t + 2); }
        if (n > 3) { yt += yStride; yt[0] = Vector256.Sum(a03) - Offset<TB>(xSum, t + 3); yt[1] = Vector256.Sum(a13) - Offset<TB>(xSum, t + 3); }
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
