using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using AnyPrecML.Quantization;

namespace AnyPrecML.Kernels;

/// <summary>Arithmetic of the CPU kernels.</summary>
public enum KernelAccuracy
{
    /// <summary>fp32 tables and activations, fp32 accumulation (the default; relative error ~1e-6).</summary>
    Float32,
    /// <summary>
    /// Opt-in: each token's activations to int8 (symmetric, scale max|x|/127) and each row's table to 7-bit
    /// unsigned affine (min + scale·u, u ≤ 127), integer multiply-adds (vpmaddubsw + vpmaddwd), one fp32
    /// rescale per output. Bound: |y − y_fp32| ≤ ½·s_x·Σ_j|T(c_j)| + ½·s_T·Σ_j|x_j| + fp32 rounding, with
    /// s_x = max|x|/127 and s_T = (max T − min T)/127 of the row. Runs where AVX-512 BW, VBMI and GFNI are
    /// present; elsewhere it falls back to <see cref="Float32"/>.
    /// </summary>
    Int8,
}

public static unsafe partial class BitplaneKernels
{
    /// <summary>True when the int8 kernels can run here.</summary>
    public static bool SupportsInt8 => IsSupported(KernelPath.Vector512) && UsesGfni;

    /// <summary>A row's b-bit table as 7-bit unsigned codes: T ≈ Min + Scale·U.</summary>
    internal sealed class Int8Tables
    {
        public required byte[] U;      // [rows, 2^b] padded by 64 bytes (whole-register loads)
        public required float[] Scale, Min;

        public static Int8Tables Build(BitplaneMatrix m, int bits)
        {
            int k = 1 << bits;
            var table = m.Table(bits);
            var u = GC.AllocateArray<byte>(m.Rows * k + 64, pinned: true);
            var scale = new float[m.Rows];
            var min = new float[m.Rows];
            for (int r = 0; r < m.Rows; r++)
            {
                float lo = float.MaxValue, hi = float.MinValue;
                for (int c = 0; c < k; c++) { float v = (float)table[r * k + c]; lo = Math.Min(lo, v); hi = Math.Max(hi, v); }
                float s = hi > lo ? (hi - lo) / 127f : 1f;
                scale[r] = s; min[r] = lo;
                for (int c = 0; c < k; c++) u[r * k + c] = (byte)Math.Clamp(MathF.Round(((float)table[r * k + c] - lo) / s), 0, 127);
            }
            return new Int8Tables { U = u, Scale = scale, Min = min };
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
    /// One token's activations to int8 in the GFNI column order (zero-padded to whole registers);
    /// returns the scale and the sum of the int8 values.
    /// </summary>
    internal static (float Scale, int Sum) QuantizeActivations(ReadOnlySpan<float> x, Span<sbyte> permuted, int cols)
    {
        float max = Math.Abs(System.Numerics.Tensors.TensorPrimitives.MaxMagnitude(x)); // MaxMagnitude keeps the sign
        float s = max > 0 ? max / 127f : 1f;
        Span<sbyte> q = cols <= 16384 ? stackalloc sbyte[cols] : new sbyte[cols];
        int sum = 0;
        for (int j = 0; j < cols; j++) { q[j] = (sbyte)Math.Clamp((int)MathF.Round(x[j] / s), -127, 127); sum += q[j]; }
        int blocks = cols / GfniBlock;
        for (int b = 0; b < blocks; b++)
            for (int g = 0; g < 64; g++)
                q.Slice(b * GfniBlock + 8 * ByteOrigin[g], 8).CopyTo(permuted.Slice(b * GfniBlock + 8 * g, 8));
        q[(blocks * GfniBlock)..].CopyTo(permuted[(blocks * GfniBlock)..cols]);
        return (s, sum);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<byte> LookupBytes(Vector512<byte> codes, int bits, Vector512<byte> t0, Vector512<byte> t1, Vector512<byte> t2, Vector512<byte> t3) => bits switch
    {
        <= 6 => Avx512Vbmi.PermuteVar64x8(t0, codes),
        7 => Avx512Vbmi.PermuteVar64x8x2(t0, codes, t1),
        _ => Vector512.ConditionalSelect(Vector512.Equals(codes & Vector512.Create((byte)0x80), Vector512.Create((byte)0x80)),
            Avx512Vbmi.PermuteVar64x8x2(t2, codes, t3), Avx512Vbmi.PermuteVar64x8x2(t0, codes, t1)),
    };

    /// <summary>
    /// Int8 rows: y[t, r] = s_x[t]·(Scale[r]·Σ_j U[r, c_j]·x8[t, j] + Min[r]·Σ_j x8[t, j]).
    /// x8 is [m, cols] int8 in GFNI column order.
    /// </summary>
    [SkipLocalsInit]
    internal static void RowsInt8(in BitplaneOperand w, Int8Tables tables, sbyte* x8, float* xScale, int* xSum, int m, float* y, int rowStart, int rowEnd)
    {
        int k = 1 << w.Bits, full = w.Cols >> 5, blocks = full / 16, empty = 8 - w.Bits;
        long stride = w.PlaneStride;
        var c = stackalloc Vector512<byte>[8];
        var acc = stackalloc Vector512<int>[Math.Max(m, 1)];
        var words = stackalloc Vector512<uint>[8];
        var ones = Vector512.Create((short)1);
        fixed (byte* u0 = tables.U)
        {
            for (int r = rowStart; r < rowEnd; r++)
            {
                byte* u = u0 + (long)r * k;
                uint* planes = w.Planes + (long)r * w.Words;
                var t0 = Vector512.Load(u);
                var t1 = w.Bits >= 7 ? Vector512.Load(u + 64) : default;
                var t2 = w.Bits == 8 ? Vector512.Load(u + 128) : default;
                var t3 = w.Bits == 8 ? Vector512.Load(u + 192) : default;
                for (int t = 0; t < m; t++) acc[t] = Vector512<int>.Zero;
                // One token (decode): two register accumulators; several: one per token in memory.
                var acc0 = Vector512<int>.Zero;
                var acc1 = Vector512<int>.Zero;
                for (int b = 0; b < blocks; b++)
                {
                    int word = 16 * b;
                    TransposeBytes(PlaneBlock(planes, stride, 0, empty, word), PlaneBlock(planes, stride, 1, empty, word),
                        PlaneBlock(planes, stride, 2, empty, word), PlaneBlock(planes, stride, 3, empty, word),
                        PlaneBlock(planes, stride, 4, empty, word), PlaneBlock(planes, stride, 5, empty, word),
                        PlaneBlock(planes, stride, 6, empty, word), PlaneBlock(planes, stride, 7, empty, word), c);
                    for (int o = 0; o < 8; o += 2)
                    {
                        var w0 = LookupBytes(Gfni.V512.GaloisFieldAffineTransform(BitIdentity, c[o], 0), w.Bits, t0, t1, t2, t3);
                        var w1 = LookupBytes(Gfni.V512.GaloisFieldAffineTransform(BitIdentity, c[o + 1], 0), w.Bits, t0, t1, t2, t3);
                        int j = GfniBlock * b + 64 * o;
                        if (m == 1)
                        {
                            // u ≤ 127 and |x8| ≤ 127: a pair of products fits int16 without saturation.
                            acc0 += Avx512BW.MultiplyAddAdjacent(Avx512BW.MultiplyAddAdjacent(w0, Vector512.Load(x8 + j)), ones);
                            acc1 += Avx512BW.MultiplyAddAdjacent(Avx512BW.MultiplyAddAdjacent(w1, Vector512.Load(x8 + j + 64)), ones);
                            continue;
                        }
                        for (int t = 0; t < m; t++)
                        {
                            sbyte* xt = x8 + (long)t * w.Cols + j;
                            acc[t] += Avx512BW.MultiplyAddAdjacent(Avx512BW.MultiplyAddAdjacent(w0, Vector512.Load(xt)), ones)
                                + Avx512BW.MultiplyAddAdjacent(Avx512BW.MultiplyAddAdjacent(w1, Vector512.Load(xt + 64)), ones);
                        }
                    }
                }
                if (m == 1) acc[0] = acc0 + acc1;
                // Whole words past the last GFNI block (11008 columns leave 8): 32 codes at a time, in column order,
                // looked up in the byte table like the blocks; only the last partial word is scalar.
                for (int word = blocks * 16; word < full; word++)
                {
                    for (int p = 0; p < w.Bits; p++) words[p] = Vector512.Create(planes[p * stride + word]);
                    var lo = Avx512F.ConvertToVector128Byte(Codes512(words, w.Bits, Lanes512[0]).AsUInt32());
                    var hi = Avx512F.ConvertToVector128Byte(Codes512(words, w.Bits, Lanes512[1]).AsUInt32());
                    var wv = LookupBytes(Vector512.Create(Vector256.Create(lo, hi), Vector256<byte>.Zero), w.Bits, t0, t1, t2, t3);
                    for (int t = 0; t < m; t++)
                    {
                        var xv = Vector512.Create(Vector256.Load(x8 + (long)t * w.Cols + 32 * word), Vector256<sbyte>.Zero);
                        acc[t] += Avx512BW.MultiplyAddAdjacent(Avx512BW.MultiplyAddAdjacent(wv, xv), ones);
                    }
                }
                for (int t = 0; t < m; t++)
                {
                    int s = Vector512.Sum(acc[t]);
                    sbyte* xt = x8 + (long)t * w.Cols;
                    for (int j = full * 32; j < w.Cols; j++) s += u[Code(w, planes, j >> 5, j & 31)] * xt[j];
                    y[(long)t * w.Rows + r] = xScale[t] * (tables.Scale[r] * s + tables.Min[r] * xSum[t]);
                }
            }
        }
    }
}
