using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace AnyPrecML.Kernels;

// The int8 level on AVX-512 with GFNI and VBMI: 64 codes at a time by the 8×8 bit transpose of the fp32 path,
// bytes looked up by vpermb/vpermt2b, products by vpmaddubsw + vpmaddwd. x8 is in GFNI column order.
public static unsafe partial class BitplaneKernels
{
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<byte> LookupBytes(Vector512<byte> codes, int bits, Vector512<byte> t0, Vector512<byte> t1, Vector512<byte> t2, Vector512<byte> t3) => bits switch
    {
        <= 6 => Avx512Vbmi.PermuteVar64x8(t0, codes),
        7 => Avx512Vbmi.PermuteVar64x8x2(t0, codes, t1),
        _ => Vector512.ConditionalSelect(Vector512.Equals(codes & Vector512.Create((byte)0x80), Vector512.Create((byte)0x80)),
            Avx512Vbmi.PermuteVar64x8x2(t2, codes, t3), Avx512Vbmi.PermuteVar64x8x2(t0, codes, t1)),
    };

    /// <summary>
    /// acc += Σ of each 4 adjacent products v·x as |x|·(v·sign x) (|v|, |x| ≤ 127: vpmaddubsw cannot saturate);
    /// AVX-512 has no vpsignb, so v·sign x = (v ^ s) − s with s = 0 or −1.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<int> MultiplyAdd512(Vector512<int> acc, Vector512<byte> v, byte* xAbs, sbyte* xSign) 
    {
        var s = Vector512.Load(xSign);
        var signed = (v.AsSByte() ^ s) - s;
        return acc + Avx512BW.MultiplyAddAdjacent(Avx512BW.MultiplyAddAdjacent(Vector512.Load(xAbs), signed), Vector512.Create((short)1));
    }

    /// <summary>Int8 rows: y[t, r] = Σ_j V[r, c_j]·x8[t, j] (the caller rescales); x8, |x8|, sign(x8) are [m, xStride] in GFNI column order.</summary>
    [SkipLocalsInit]
    private static void RowsInt8Gfni512(in BitplaneOperand w, byte* u0, sbyte* x8, byte* xAbs, sbyte* xSign, int xStride, int m, float* y, int rowStart, int rowEnd)
    {
        int k = 1 << w.Bits, full = w.Cols >> 5, blocks = full / 16, empty = 8 - w.Bits;
        long stride = w.PlaneStride;
        var c = stackalloc Vector512<byte>[8];
        var acc = stackalloc Vector512<int>[Math.Max(m, 1)];
        var words = stackalloc Vector512<uint>[8];
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
                        acc0 = MultiplyAdd512(acc0, w0, xAbs + j, xSign + j);
                        acc1 = MultiplyAdd512(acc1, w1, xAbs + j + 64, xSign + j + 64);
                        continue;
                    }
                    for (int t = 0; t < m; t++)
                    {
                        long at = (long)t * xStride + j;
                        acc[t] = MultiplyAdd512(MultiplyAdd512(acc[t], w0, xAbs + at, xSign + at), w1, xAbs + at + 64, xSign + at + 64);
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
                // The upper 32 lanes would look up code 0: zero them, so the activations read past the word add nothing.
                var wv = Vector512.Create(LookupBytes(Vector512.Create(Vector256.Create(lo, hi), Vector256<byte>.Zero), w.Bits, t0, t1, t2, t3).GetLower(), Vector256<byte>.Zero);
                for (int t = 0; t < m; t++)
                {
                    long at = (long)t * xStride + 32 * word;
                    acc[t] = MultiplyAdd512(acc[t], wv, xAbs + at, xSign + at);
                }
            }
            for (int t = 0; t < m; t++)
            {
                int s = Vector512.Sum(acc[t]);
                sbyte* xt = x8 + (long)t * xStride;
                for (int j = full * 32; j < w.Cols; j++) s += (sbyte)u[Code(w, planes, j >> 5, j & 31)] * xt[j];
                y[(long)t * w.Rows + r] = s;
            }
        }
    }
}
