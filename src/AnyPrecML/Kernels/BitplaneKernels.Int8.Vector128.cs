using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace AnyPrecML.Kernels;

// The int8 level on 128-bit vectors with portable operations only (SSE, ARM64 AdvSimd): the Slice256 order of
// the AVX2 path taken 16 bytes at a time. Correct everywhere, not tuned: on x86 the AVX2 path runs instead.
public static unsafe partial class BitplaneKernels
{
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void RowsInt8Vector128(in BitplaneOperand w, sbyte* u0, sbyte* x8, int xStride, int m, float* y, int rowStart, int rowEnd, byte* scratch)
    {
        int k = 1 << w.Bits, blocks = xStride >> 8;
        byte* tail = scratch, decoded = scratch + 256;
        for (int r = rowStart; r < rowEnd; r++)
        {
            uint* planes = w.Planes + (long)r * w.Words;
            sbyte* u = u0 + (long)r * k;
            for (int block = 0; block < blocks; block++)
            {
                byte* src = BlockPlanes(w, planes, block, w.Bits, tail, out long stride);
                for (int slice = 0; slice < 8; slice++)
                    for (int half = 0; half < 32; half += 16)
                    {
                        var code = Vector128<byte>.Zero;
                        for (int p = 0; p < w.Bits; p++)
                            code |= ((Vector128.Load(src + p * stride + half) >>> slice) & Vector128<byte>.One) << (w.Bits - 1 - p);
                        Lookup128((byte*)u, w.Bits, code).Store(decoded + 256 * block + 32 * slice + half);
                    }
            }
            for (int t = 0; t < m; t++)
            {
                sbyte* x = x8 + (long)t * xStride;
                var acc = Vector128<int>.Zero;
                for (int j = 0; j < xStride; j += 16)
                {
                    var (dl, dh) = Vector128.Widen(Vector128.Load((sbyte*)decoded + j));
                    var (xl, xh) = Vector128.Widen(Vector128.Load(x + j));
                    // |v| ≤ 127 and |x| ≤ 127: each product fits int16.
                    var (p0, p1) = Vector128.Widen(dl * xl);
                    var (p2, p3) = Vector128.Widen(dh * xh);
                    acc += (p0 + p1) + (p2 + p3);
                }
                y[(long)t * w.Rows + r] = Vector128.Sum(acc);
            }
        }
    }

    /// <summary>Table bytes for 16 codes: one shuffle per 16-entry sub-table, kept where the code's upper bits name it.</summary>
    private static Vector128<byte> Lookup128(byte* u, int bits, Vector128<byte> code)
    {
        var low = code & Vector128.Create((byte)15);
        if (bits <= 4) return Vector128.Shuffle(Vector128.Load(u), low);
        var high = code >>> 4;
        var r = Vector128<byte>.Zero;
        for (int h = 0; h < 1 << (bits - 4); h++)
            r = Vector128.ConditionalSelect(Vector128.Equals(high, Vector128.Create((byte)h)), Vector128.Shuffle(Vector128.Load(u + 16 * h), low), r);
        return r;
    }
}
