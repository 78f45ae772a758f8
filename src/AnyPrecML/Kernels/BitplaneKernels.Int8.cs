using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using AnyPrecML.Quantization;

namespace AnyPrecML.Kernels;

/// <summary>Arithmetic of the CPU kernels.</summary>
public enum KernelAccuracy
{
    /// <summary>
    /// The default on CPU: each token's activations to int8 (symmetric, scale max|x|/127) and each row's table to
    /// signed 8-bit affine (mid + scale·v, |v| ≤ 127: 255 levels), integer multiply-adds (vpmaddubsw on |x| and
    /// v·sign(x), then vpmaddwd; vpdpbusd with AVX-VNNI), one fp32 rescale per output. Bound: |y − y_fp32| ≤
    /// ½·s_x·Σ_j|T(c_j)| + ½·s_T·Σ_j|x_j| + fp32 rounding, with s_x = max|x|/127 and s_T = (max T − min T)/254 of the
    /// row. Runs on every path.
    /// </summary>
    Int8,
    /// <summary>fp32 tables and activations, fp32 accumulation (relative error ~1e-6).</summary>
    Float32,
}

/// <summary>How an int8 kernel wants x's columns laid out, so that its decoded codes meet their activations.</summary>
internal enum Int8ColumnOrder
{
    /// <summary>Column order (the scalar reference and the AVX-512 VBMI kernels).</summary>
    Natural,
    /// <summary>
    /// Bit slices of 256-column blocks: in a block of 8 plane words, byte i of the 32 plane bytes holds columns
    /// 8i..8i+7, so bit k of every byte is the slice {8i + k}; slice k is stored at 32k + i. A partial last block is
    /// padded with zeros. The Vector256 and Vector128 paths read every plane byte once per slice with shift and and.
    /// </summary>
    Slice256,
}

public static unsafe partial class BitplaneKernels
{
    /// <summary>True when <paramref name="path"/> has int8 kernels here: every path does (the 512-bit one with GFNI and VBMI).</summary>
    public static bool SupportsInt8(KernelPath path) => IsSupported(path) && (path != KernelPath.Vector512 || UsesGfni);

    /// <summary>True when int8 products accumulate with AVX-VNNI's vpdpbusd (else vpmaddubsw + vpmaddwd).</summary>
    public static bool UsesVnni => System.Runtime.Intrinsics.X86.AvxVnni.IsSupported;

    internal static Int8ColumnOrder Int8Order(KernelPath path) => path switch
    {
        KernelPath.Vector256 or KernelPath.Vector128 => Int8ColumnOrder.Slice256,
        _ => Int8ColumnOrder.Natural,
    };

    /// <summary>Bytes one token's int8 activations take in <paramref name="order"/> (padding included).</summary>
    internal static int Int8Stride(Int8ColumnOrder order, int cols) => order == Int8ColumnOrder.Slice256 ? (cols + 255) & ~255 : cols;

    /// <summary>
    /// Bytes from one token's x8 to the next for <paramref name="path"/>'s kernels: <see cref="Int8Stride"/>, rounded up to
    /// 64 on the 512-bit path, whose decoded rows (and so x8 rows) are whole 64-byte groups (the bytes past the last
    /// column meet zero weights, so they may hold anything).
    /// </summary>
    internal static int Int8TokenStride(KernelPath path, int cols) =>
        path == KernelPath.Vector512 ? (cols + 63) & ~63 : Int8Stride(Int8Order(path), cols);

    /// <summary>
    /// A row's b-bit table as signed bytes: T ≈ Mid + Scale·V, |V| ≤ 127. Seven unsigned bits (128 levels) cost 0.6%
    /// perplexity at b = 4 on stories260K; 255 levels stay under 0.5% at every width. The kernels keep products
    /// exact by multiplying |x| (unsigned) with V·sign(x) (signed): |pair sums| ≤ 2·127·127 fit vpmaddubsw.
    /// </summary>
    internal sealed class Int8Tables
    {
        // [rows, 2^b] table bytes, padded by 64 bytes (whole-register loads): the signed values V as bytes, or U = V + 128
        // as unsigned bytes for vpdpbusd (see TableBytes). A process's kernels read one of the two, so only that one is
        // built; the other is derived on first use (the scalar and 128-bit references read V): at b = 8 on the 1.1B shape
        // one form is 100 MB.
        private byte[]? _v, _u;
        public required float[] Scale, Mid;

        public byte[] V => _v ?? LazyInitializer.EnsureInitialized(ref _v, () => Flipped(_u!));
        public byte[] U => _u ?? LazyInitializer.EnsureInitialized(ref _u, () => Flipped(_v!));

        private static byte[] Flipped(byte[] table)
        {
            var flipped = GC.AllocateArray<byte>(table.Length, pinned: true);
            TensorPrimitives.Xor(table, (byte)0x80, flipped);
            return flipped;
        }

        public static Int8Tables Build(BitplaneMatrix m, int bits)
        {
            int k = 1 << bits;
            var t = GC.AllocateArray<byte>(m.Rows * k + 64, pinned: true);
            var scale = new float[m.Rows];
            var mid = new float[m.Rows];
            // In blocks of rows on every core: the first product at a new width waits for its tables (b = 8, 1.1B shape:
            // 100 M entries).
            byte offset = OffsetTables ? (byte)0x80 : (byte)0;
            Parallel.For(0, (m.Rows + 255) / 256, block =>
            {
                var table = m.Table(bits);
                for (int r = block * 256; r < Math.Min(m.Rows, block * 256 + 256); r++)
                {
                    float lo = float.MaxValue, hi = float.MinValue;
                    for (int c = 0; c < k; c++) { float x = (float)table[r * k + c]; lo = Math.Min(lo, x); hi = Math.Max(hi, x); }
                    float s = hi > lo ? (hi - lo) / 254f : 1f, center = (hi + lo) / 2;
                    scale[r] = s; mid[r] = center;
                    for (int c = 0; c < k; c++) t[r * k + c] = (byte)((byte)(sbyte)Math.Clamp(MathF.Round(((float)table[r * k + c] - center) / s), -127, 127) ^ offset);
                }
            });
            // The 64 padding bytes hold the form's zero (0, or 128 offset), as V's padding held 0 before U was derived from it.
            t.AsSpan(m.Rows * k).Fill(offset);
            return OffsetTables ? new Int8Tables { _u = t, Scale = scale, Mid = mid } : new Int8Tables { _v = t, Scale = scale, Mid = mid };
        }
    }

    private static readonly ConditionalWeakTable<BitplaneMatrix, Int8Tables?[]> Int8Cache = new();

    /// <summary>The int8 tables of <paramref name="m"/> at <paramref name="bits"/>, built once and kept while the matrix lives.</summary>
    internal static Int8Tables Int8TablesOf(BitplaneMatrix m, int bits)
    {
        var perBits = Int8Cache.GetValue(m, x => new Int8Tables?[x.ParentBits + 1]);
        lock (perBits) return perBits[bits] ??= Int8Tables.Build(m, bits);
    }

    /// <summary>
    /// One token's activations to int8 in <paramref name="order"/>: x8, and where the order's kernels read them |x8|
    /// and sign(x8) (0 or −1 per byte; pass an empty span to skip either), each <see cref="Int8Stride"/> bytes with
    /// the padding zeroed. Returns the scale and the sum of the int8 values. On x86 with AVX the rounding, narrowing
    /// and the Slice256 scatter run in 256-bit registers (a serial step before every product: 9.3 µs scalar at 2048
    /// columns in Slice256 order, 1/20 of a 2048×2048 product at 3 bits); the result equals
    /// <see cref="QuantizeActivationsScalar"/> byte for byte (both round half to even).
    /// </summary>
    [SkipLocalsInit]
    internal static (float Scale, int Sum) QuantizeActivations(ReadOnlySpan<float> x, Span<sbyte> x8, Span<byte> abs, Span<sbyte> sign, Int8ColumnOrder order)
    {
        if (!Vector256.IsHardwareAccelerated || !Avx.IsSupported) return QuantizeActivationsScalar(x, x8, abs, sign, order);
        int cols = x.Length, stride = Int8Stride(order, cols);
        float s = ActivationScale(x), inv = 1 / s;
        int sum = order == Int8ColumnOrder.Slice256 ? QuantizeSlice256Avx(x, inv, x8[..stride]) : QuantizeNaturalVector(x, inv, x8[..cols]);
        if (abs.Length > 0) TensorPrimitives.Abs(x8[..stride], MemoryMarshal.Cast<byte, sbyte>(abs[..stride])); // |v| ≤ 127: no overflow
        if (sign.Length > 0) TensorPrimitives.ShiftRightArithmetic(x8[..stride], 7, sign[..stride]);
        return (s, sum);
    }

    /// <summary>The activation scale max|x|/127 (1 for an all-zero token).</summary>
    private static float ActivationScale(ReadOnlySpan<float> x)
    {
        float max = Math.Abs(TensorPrimitives.MaxMagnitude(x)); // MaxMagnitude keeps the sign
        return max > 0 ? max / 127f : 1f;
    }

    /// <summary>The reference of <see cref="QuantizeActivations"/>, one column at a time.</summary>
    internal static (float Scale, int Sum) QuantizeActivationsScalar(ReadOnlySpan<float> x, Span<sbyte> x8, Span<byte> abs, Span<sbyte> sign, Int8ColumnOrder order)
    {
        int cols = x.Length, stride = Int8Stride(order, cols);
        float s = ActivationScale(x), inv = 1 / s;
        Span<sbyte> q = order == Int8ColumnOrder.Natural ? x8 : new sbyte[cols];
        int sum = 0;
        // |x·inv| ≤ 127 by construction; any rounding keeps the stated bound (half a step).
        for (int j = 0; j < cols; j++) { int v = (int)MathF.Round(x[j] * inv); q[j] = (sbyte)v; sum += v; }
        if (order == Int8ColumnOrder.Slice256)
        {
            x8[..stride].Clear();
            for (int j = 0; j < cols; j++) x8[(j & ~255) + 32 * (j & 7) + ((j & 255) >> 3)] = q[j];
        }
        for (int j = 0; j < abs.Length && j < stride; j++) abs[j] = (byte)Math.Abs(x8[j]);
        for (int j = 0; j < sign.Length && j < stride; j++) sign[j] = (sbyte)(x8[j] >> 7);
        return (s, sum);
    }

    /// <summary>Natural order: round(x·inv) 32 columns per step (Vector256.Round rounds half to even, as MathF.Round).</summary>
    private static int QuantizeNaturalVector(ReadOnlySpan<float> x, float inv, Span<sbyte> x8)
    {
        int cols = x.Length, j = 0;
        var scale = Vector256.Create(inv);
        var acc = Vector256<int>.Zero;
        ref float src = ref MemoryMarshal.GetReference(x);
        ref sbyte dst = ref MemoryMarshal.GetReference(x8);
        for (; j + 32 <= cols; j += 32)
        {
            var a = Vector256.ConvertToInt32(Vector256.Round(Vector256.LoadUnsafe(ref src, (nuint)j) * scale));
            var b = Vector256.ConvertToInt32(Vector256.Round(Vector256.LoadUnsafe(ref src, (nuint)j + 8) * scale));
            var c = Vector256.ConvertToInt32(Vector256.Round(Vector256.LoadUnsafe(ref src, (nuint)j + 16) * scale));
            var d = Vector256.ConvertToInt32(Vector256.Round(Vector256.LoadUnsafe(ref src, (nuint)j + 24) * scale));
            acc += (a + b) + (c + d);
            Vector256.Narrow(Vector256.Narrow(a, b), Vector256.Narrow(c, d)).StoreUnsafe(ref dst, (nuint)j);
        }
        int sum = Vector256.Sum(acc);
        for (; j < cols; j++) { int v = (int)MathF.Round(x[j] * inv); x8[j] = (sbyte)v; sum += v; }
        return sum;
    }

    /// <summary>
    /// Slice256 order: each 256-column block is 32 rows of 8 columns; slice k (columns 8i + k) goes to bytes 32k..32k+31.
    /// Eight rows at a time are transposed in registers (the 8×8 float transpose), so slice k of rows i..i+7 is one
    /// vector, rounded, and four of them narrow to slice k's 32 bytes. A partial last block goes through a zeroed copy.
    /// </summary>
    [SkipLocalsInit]
    private static int QuantizeSlice256Avx(ReadOnlySpan<float> x, float inv, Span<sbyte> x8)
    {
        int cols = x.Length, full = cols & ~255;
        var scale = Vector256.Create(inv);
        var acc = Vector256<int>.Zero;
        Span<int> slices = stackalloc int[256]; // [slice k][row i] of one block, as int32
        fixed (float* x0 = x)
        fixed (sbyte* out0 = x8)
        fixed (int* q = slices)
        {
            float* pad = stackalloc float[256];
            for (int block = 0; block < x8.Length; block += 256)
            {
                float* src = x0 + block;
                if (block >= full)
                {
                    new Span<float>(pad, 256).Clear();
                    x.Slice(block).CopyTo(new Span<float>(pad, 256));
                    src = pad;
                }
                for (int i = 0; i < 32; i += 8)
                {
                    float* r = src + 8 * i;
                    var (c0, c1, c2, c3, c4, c5, c6, c7) = Transpose8(Avx.LoadVector256(r), Avx.LoadVector256(r + 8), Avx.LoadVector256(r + 16), Avx.LoadVector256(r + 24),
                        Avx.LoadVector256(r + 32), Avx.LoadVector256(r + 40), Avx.LoadVector256(r + 48), Avx.LoadVector256(r + 56));
                    acc += Store(q + i, c0, scale) + Store(q + 32 + i, c1, scale) + Store(q + 64 + i, c2, scale) + Store(q + 96 + i, c3, scale)
                        + Store(q + 128 + i, c4, scale) + Store(q + 160 + i, c5, scale) + Store(q + 192 + i, c6, scale) + Store(q + 224 + i, c7, scale);
                }
                for (int k = 0; k < 256; k += 32)
                    Vector256.Narrow(Vector256.Narrow(Vector256.Load(q + k), Vector256.Load(q + k + 8)), Vector256.Narrow(Vector256.Load(q + k + 16), Vector256.Load(q + k + 24)))
                        .Store(out0 + block + k);
            }
        }
        return Vector256.Sum(acc);

        static Vector256<int> Store(int* dst, Vector256<float> v, Vector256<float> scale)
        {
            var r = Vector256.ConvertToInt32(Vector256.Round(v * scale));
            r.Store(dst);
            return r;
        }
    }

    /// <summary>The 8×8 float transpose: column k of rows r0..r7 as one vector.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static (Vector256<float>, Vector256<float>, Vector256<float>, Vector256<float>, Vector256<float>, Vector256<float>, Vector256<float>, Vector256<float>) Transpose8(
        Vector256<float> r0, Vector256<float> r1, Vector256<float> r2, Vector256<float> r3, Vector256<float> r4, Vector256<float> r5, Vector256<float> r6, Vector256<float> r7)
    {
        var t0 = Avx.UnpackLow(r0, r1); var t1 = Avx.UnpackHigh(r0, r1); var t2 = Avx.UnpackLow(r2, r3); var t3 = Avx.UnpackHigh(r2, r3);
        var t4 = Avx.UnpackLow(r4, r5); var t5 = Avx.UnpackHigh(r4, r5); var t6 = Avx.UnpackLow(r6, r7); var t7 = Avx.UnpackHigh(r6, r7);
        var u0 = Avx.Shuffle(t0, t2, 0x44); var u1 = Avx.Shuffle(t0, t2, 0xEE); var u2 = Avx.Shuffle(t1, t3, 0x44); var u3 = Avx.Shuffle(t1, t3, 0xEE);
        var u4 = Avx.Shuffle(t4, t6, 0x44); var u5 = Avx.Shuffle(t4, t6, 0xEE); var u6 = Avx.Shuffle(t5, t7, 0x44); var u7 = Avx.Shuffle(t5, t7, 0xEE);
        return (Avx.Permute2x128(u0, u4, 0x20), Avx.Permute2x128(u1, u5, 0x20), Avx.Permute2x128(u2, u6, 0x20), Avx.Permute2x128(u3, u7, 0x20),
            Avx.Permute2x128(u0, u4, 0x31), Avx.Permute2x128(u1, u5, 0x31), Avx.Permute2x128(u2, u6, 0x31), Avx.Permute2x128(u3, u7, 0x31));
    }

    /// <summary>
    /// Int8 rows: y[t, r] = s_x[t]·(Scale[r]·Σ_j V[r, c_j]·x8[t, j] + Mid[r]·Σ_j x8[t, j]). x8, |x8| and sign(x8)
    /// are [m, xStride] in the path's <see cref="Int8Order"/>.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static void RowsInt8(KernelPath path, in BitplaneOperand w, Int8Tables tables, sbyte* x8, byte* xAbs, sbyte* xSign, int xStride,
        float* xScale, int* xSum, int m, float* y, int rowStart, int rowEnd, byte* scratch)
    {
        // The 512- and 256-bit kernels read the offset form where AVX-VNNI makes them multiply it (TableBytes); the rest V.
        bool offset = TableBytes.Offset && path is KernelPath.Vector512 or KernelPath.Vector256;
        fixed (byte* t = offset ? tables.U : tables.V)
        {
            switch (path)
            {
                case KernelPath.Vector512: RowsInt8Vbmi512(w, t, x8, xAbs, xSign, xSum, xStride, m, y, rowStart, rowEnd, scratch); break;
                case KernelPath.Vector256: RowsInt8Avx2(w, t, x8, xAbs, xSum, xStride, m, y, rowStart, rowEnd, scratch); break;
                case KernelPath.Vector128: RowsInt8Vector128(w, (sbyte*)t, x8, xStride, m, y, rowStart, rowEnd, scratch); break;
                default: RowsInt8Scalar(w, (sbyte*)t, x8, xStride, m, y, rowStart, rowEnd); break;
            }
        }
        // The paths above leave the exact Σ_j V·x8 in y; the affine table and the activation scale make it y.
        for (int t = 0; t < m; t++)
            for (int r = rowStart; r < rowEnd; r++)
            {
                ref float o = ref y[(long)t * w.Rows + r];
                o = xScale[t] * (tables.Scale[r] * o + tables.Mid[r] * xSum[t]);
            }
    }

    /// <summary>
    /// Whether m = 2..4 tokens meet each row's table bytes in registers, as they are looked up (decode of 2-4 batched
    /// sequences, verify passes of 1-3 drafts), rather than through the decoded-rows tiles (a group of rows stored as
    /// bytes and read back once per token tile). In registers the decode stays shared and the bytes never go to memory;
    /// it loses at wide b, where a block's lookups already fill the registers. Chosen per path from
    /// 4096×4096 products, 2 threads (Zen 5 and Zen 4; docs/BENCHMARKS.md "Two to four tokens in registers" and
    /// "Eleventh session"):
    /// <list type="bullet">
    /// <item>512-bit, VNNI (Zen 5): m = 2 at every b (−23..−39%), m = 3 up to b = 7 (−10..−27%), m = 4 up to b = 6 (−10..−15%, at b = 5, 6
    /// level in a second, noisier run; beyond, level or slower);</item>
    /// <item>512-bit without VNNI, the same rule, from a real Zen 4: m = 2 at every b (−5..−36%), m = 3 up to b = 7, m = 4
    /// up to b = 6; the tiles were 1-7% faster at m = 3, b = 8 and 1-10% at m = 4, b = 7, 8 (on a Zen 5 with VNNI hidden,
    /// the registers had looked faster at every b: what runs this path in practice is a Zen 4 or an Ice Lake);</item>
    /// <item>AVX2 + VNNI: m = 2 at every b (−8..−43%), m = 3, 4 up to b = 5 (−11..−43%; slower from b = 6);</item>
    /// <item>AVX2 alone (Zen 2/3): m = 2 up to b = 5 (−11..−29%), m = 3 up to b = 4 (−14..−16%); its products are four ops and lose sooner.</item>
    /// </list>
    /// <c>ANYPREC_FEW_TOKENS=registers</c> (or <c>tiles</c>) in the environment forces one route on every path: to
    /// measure both on another CPU (<c>anyprec bench kernels</c>), and so the tests check both wherever the rule does not
    /// take them.
    /// </summary>
    internal static bool FewTokensInRegisters(KernelPath path, int m, int bits) => m is >= 2 and <= 4 && (FewTokensRoute ?? path switch
    {
        KernelPath.Vector512 => m == 2 || bits <= (m == 3 ? 7 : 6),
        KernelPath.Vector256 => TableBytes.Offset ? m == 2 || bits <= 5 : m == 2 ? bits <= 5 : m == 3 && bits <= 4,
        _ => false,
    });

    /// <summary>The route <c>ANYPREC_FEW_TOKENS</c> forces (registers: true, tiles: false), or null for the measured rule.</summary>
    private static readonly bool? FewTokensRoute = Environment.GetEnvironmentVariable("ANYPREC_FEW_TOKENS") switch
    {
        "registers" => true,
        "tiles" => false,
        _ => null,
    };

    /// <summary>
    /// What <c>ANYPREC_FEW_TOKENS</c> does, for the int8 backend's name (so every bench's first line says it), or null
    /// when it is not set. A value it does not know is named as ignored rather than silently dropped.
    /// </summary>
    internal static string? FewTokensNote => Environment.GetEnvironmentVariable("ANYPREC_FEW_TOKENS") switch
    {
        null => null,
        "registers" => "2-4 tokens forced into registers",
        "tiles" => "2-4 tokens forced through tiles",
        var other => $"ANYPREC_FEW_TOKENS={other} ignored (registers or tiles)",
    };

    /// <summary>Bytes of scratch one thread needs for the int8 kernels on a matrix of <paramref name="cols"/> columns.</summary>
    internal static int Int8ScratchBytes(int cols) => 256 + Int8RowGroup * ((cols + 255) & ~255);

    /// <summary>The scalar reference: Σ_j V[r, c_j]·x8[t, j] in column order, as an exact integer.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void RowsInt8Scalar(in BitplaneOperand w, sbyte* u0, sbyte* x8, int xStride, int m, float* y, int rowStart, int rowEnd)
    {
        int k = 1 << w.Bits;
        for (int r = rowStart; r < rowEnd; r++)
        {
            sbyte* u = u0 + (long)r * k;
            uint* planes = w.Planes + (long)r * w.Words;
            for (int t = 0; t < m; t++)
            {
                sbyte* xt = x8 + (long)t * xStride;
                int s = 0;
                for (int j = 0; j < w.Cols; j++) s += u[Code(w, planes, j >> 5, j & 31)] * xt[j];
                y[(long)t * w.Rows + r] = s;
            }
        }
    }
}
