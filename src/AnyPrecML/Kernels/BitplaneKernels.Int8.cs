using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
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
    /// <summary>Column order (the scalar reference).</summary>
    Natural,
    /// <summary>
    /// Bit slices of 256-column blocks: in a block of 8 plane words, byte i of the 32 plane bytes holds columns
    /// 8i..8i+7, so bit k of every byte is the slice {8i + k}; slice k is stored at 32k + i. A partial last block is
    /// padded with zeros. The Vector256 and Vector128 paths read every plane byte once per slice with shift and and.
    /// </summary>
    Slice256,
    /// <summary>The GFNI transpose's order inside 512-column blocks, column order after (<see cref="BitplaneKernels.PermuteColumns"/>).</summary>
    Gfni512,
}

public static unsafe partial class BitplaneKernels
{
    /// <summary>True when <paramref name="path"/> has int8 kernels here: every path does (the 512-bit one with GFNI and VBMI).</summary>
    public static bool SupportsInt8(KernelPath path) => IsSupported(path) && (path != KernelPath.Vector512 || UsesGfni);

    /// <summary>True when int8 products accumulate with AVX-VNNI's vpdpbusd (else vpmaddubsw + vpmaddwd).</summary>
    public static bool UsesVnni => System.Runtime.Intrinsics.X86.AvxVnni.IsSupported;

    internal static Int8ColumnOrder Int8Order(KernelPath path) => path switch
    {
        KernelPath.Vector512 => Int8ColumnOrder.Gfni512,
        KernelPath.Vector256 or KernelPath.Vector128 => Int8ColumnOrder.Slice256,
        _ => Int8ColumnOrder.Natural,
    };

    /// <summary>Bytes one token's int8 activations take in <paramref name="order"/> (padding included).</summary>
    internal static int Int8Stride(Int8ColumnOrder order, int cols) => order == Int8ColumnOrder.Slice256 ? (cols + 255) & ~255 : cols;

    /// <summary>
    /// A row's b-bit table as signed bytes: T ≈ Mid + Scale·V, |V| ≤ 127. Seven unsigned bits (128 levels) cost 0.6%
    /// perplexity at b = 4 on stories260K; 255 levels stay under 0.5% at every width. The kernels keep products
    /// exact by multiplying |x| (unsigned) with V·sign(x) (signed): |pair sums| ≤ 2·127·127 fit vpmaddubsw.
    /// </summary>
    internal sealed class Int8Tables
    {
        public required byte[] V;      // [rows, 2^b] signed values as bytes, padded by 64 bytes (whole-register loads)
        public required float[] Scale, Mid;

        public static Int8Tables Build(BitplaneMatrix m, int bits)
        {
            int k = 1 << bits;
            var table = m.Table(bits);
            var v = GC.AllocateArray<byte>(m.Rows * k + 64, pinned: true);
            var scale = new float[m.Rows];
            var mid = new float[m.Rows];
            for (int r = 0; r < m.Rows; r++)
            {
                float lo = float.MaxValue, hi = float.MinValue;
                for (int c = 0; c < k; c++) { float t = (float)table[r * k + c]; lo = Math.Min(lo, t); hi = Math.Max(hi, t); }
                float s = hi > lo ? (hi - lo) / 254f : 1f, center = (hi + lo) / 2;
                scale[r] = s; mid[r] = center;
                for (int c = 0; c < k; c++) v[r * k + c] = (byte)(sbyte)Math.Clamp(MathF.Round(((float)table[r * k + c] - center) / s), -127, 127);
            }
            return new Int8Tables { V = v, Scale = scale, Mid = mid };
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
    /// and sign(x8) (0 or −1 per byte), each <see cref="Int8Stride"/> bytes with the padding zeroed. Returns the scale and the sum of the int8 values.
    /// </summary>
    [SkipLocalsInit]
    internal static (float Scale, int Sum) QuantizeActivations(ReadOnlySpan<float> x, Span<sbyte> x8, Span<byte> abs, Span<sbyte> sign, Int8ColumnOrder order)
    {
        int cols = x.Length, stride = Int8Stride(order, cols);
        float max = Math.Abs(TensorPrimitives.MaxMagnitude(x)); // MaxMagnitude keeps the sign
        float s = max > 0 ? max / 127f : 1f, inv = 1 / s;
        Span<sbyte> q = order == Int8ColumnOrder.Natural ? x8 : cols <= 16384 ? stackalloc sbyte[cols] : new sbyte[cols];
        int sum = 0;
        // |x·inv| ≤ 127 by construction; any rounding keeps the stated bound (half a step).
        for (int j = 0; j < cols; j++) { int v = (int)MathF.Round(x[j] * inv); q[j] = (sbyte)v; sum += v; }
        switch (order)
        {
            case Int8ColumnOrder.Slice256:
                x8[..stride].Clear();
                for (int j = 0; j < cols; j++) x8[(j & ~255) + 32 * (j & 7) + ((j & 255) >> 3)] = q[j];
                break;
            case Int8ColumnOrder.Gfni512:
                int blocks = cols / GfniBlock;
                for (int b = 0; b < blocks; b++)
                    for (int g = 0; g < 64; g++)
                        q.Slice(b * GfniBlock + 8 * ByteOrigin[g], 8).CopyTo(x8.Slice(b * GfniBlock + 8 * g, 8));
                q[(blocks * GfniBlock)..].CopyTo(x8[(blocks * GfniBlock)..cols]);
                break;
        }
        // |x| feeds the unsigned side of vpmaddubsw/vpdpbusd on the vector paths; the sign mask only the 512-bit path
        // (AVX-512 has no vpsignb). The scalar reference multiplies x8 directly.
        if (order != Int8ColumnOrder.Natural)
            for (int j = 0; j < stride; j++) abs[j] = (byte)Math.Abs(x8[j]);
        if (order == Int8ColumnOrder.Gfni512)
            for (int j = 0; j < stride; j++) sign[j] = (sbyte)(x8[j] >> 7);
        return (s, sum);
    }

    /// <summary>
    /// Int8 rows: y[t, r] = s_x[t]·(Scale[r]·Σ_j V[r, c_j]·x8[t, j] + Mid[r]·Σ_j x8[t, j]). x8, |x8| and sign(x8)
    /// are [m, xStride] in the path's <see cref="Int8Order"/>.
    /// </summary>
    internal static void RowsInt8(KernelPath path, in BitplaneOperand w, Int8Tables tables, sbyte* x8, byte* xAbs, sbyte* xSign, int xStride,
        float* xScale, int* xSum, int m, float* y, int rowStart, int rowEnd, byte* scratch)
    {
        fixed (byte* v = tables.V)
        {
            switch (path)
            {
                case KernelPath.Vector512: RowsInt8Gfni512(w, v, x8, xAbs, xSign, xStride, m, y, rowStart, rowEnd); break;
                case KernelPath.Vector256: RowsInt8Avx2(w, v, x8, xAbs, xStride, m, y, rowStart, rowEnd, scratch); break;
                case KernelPath.Vector128: RowsInt8Vector128(w, (sbyte*)v, x8, xStride, m, y, rowStart, rowEnd, scratch); break;
                default: RowsInt8Scalar(w, (sbyte*)v, x8, xStride, m, y, rowStart, rowEnd); break;
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

    /// <summary>Bytes of scratch one thread needs for the int8 kernels on a matrix of <paramref name="cols"/> columns.</summary>
    internal static int Int8ScratchBytes(int cols) => 256 + Int8RowGroup * ((cols + 255) & ~255);

    /// <summary>The scalar reference: Σ_j V[r, c_j]·x8[t, j] in column order, as an exact integer.</summary>
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
