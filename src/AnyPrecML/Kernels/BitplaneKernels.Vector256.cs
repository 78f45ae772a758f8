using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace AnyPrecML.Kernels;

public static unsafe partial class BitplaneKernels
{
    private static readonly Vector256<uint>[] Lanes256 = Enumerable.Range(0, 4)
        .Select(g => Vector256.Create(Enumerable.Range(0, 8).Select(i => 1u << (8 * g + i)).ToArray())).ToArray();

    /// <summary>The row's table in registers (first 16 entries) and in memory (for gathers).</summary>
    private struct Table256
    {
        public Vector256<float> T0, T1;
        public float* Ptr;
    }

    private interface ILookup256
    {
        static abstract Vector256<float> Get(Vector256<int> code, ref Table256 t);
    }

    /// <summary>b ≤ 3: one in-register permute.</summary>
    private struct Permute8 : ILookup256
    {
        public static Vector256<float> Get(Vector256<int> code, ref Table256 t) => Avx2.PermuteVar8x32(t.T0, code);
    }

    /// <summary>b = 4: two permutes, picked by bit 3.</summary>
    private struct Permute16 : ILookup256
    {
        public static Vector256<float> Get(Vector256<int> code, ref Table256 t)
        {
            var high = Vector256.Equals(code & Vector256.Create(8), Vector256.Create(8)).AsSingle();
            return Avx.BlendVariable(Avx2.PermuteVar8x32(t.T0, code), Avx2.PermuteVar8x32(t.T1, code), high);
        }
    }

    /// <summary>b ≥ 5: a gather from the row's table (in L1).</summary>
    private struct Gather256 : ILookup256
    {
        public static Vector256<float> Get(Vector256<int> code, ref Table256 t) => Avx2.GatherVector256(t.Ptr, code, 4);
    }

    private static Vector256<int> Codes256(Vector256<uint>* words, int bits, Vector256<uint> lane)
    {
        var code = Vector256<int>.Zero;
        for (int p = 0; p < bits; p++) code = code + code - Vector256.Equals(words[p] & lane, lane).AsInt32();
        return code;
    }

    /// <summary>One row through the lookup that suits b: the dot product with x, or (x null) the weights decoded into dst.</summary>
    private static float Row256(in BitplaneOperand w, uint* planes, float* table, float* x, float* dst) => w.Bits switch
    {
        <= 3 => Row256<Permute8>(w, planes, table, x, dst),
        4 => Row256<Permute16>(w, planes, table, x, dst),
        _ => Row256<Gather256>(w, planes, table, x, dst),
    };

    /// <summary>One row: with <paramref name="x"/>, the dot product; with <paramref name="dst"/>, the decoded weights.</summary>
    private static float Row256<TLookup>(in BitplaneOperand w, uint* planes, float* table, float* x, float* dst) where TLookup : struct, ILookup256
    {
        var t = new Table256 { T0 = Vector256.Load(table), T1 = w.Bits >= 4 ? Vector256.Load(table + 8) : default, Ptr = table };
        var words = stackalloc Vector256<uint>[8];
        var acc0 = Vector256<float>.Zero;
        var acc1 = Vector256<float>.Zero;
        int full = w.Cols >> 5;
        for (int k = 0; k < full; k++)
        {
            for (int p = 0; p < w.Bits; p++) words[p] = Vector256.Create(planes[p * w.PlaneStride + k]);
            for (int g = 0; g < 4; g += 2)
            {
                var w0 = TLookup.Get(Codes256(words, w.Bits, Lanes256[g]), ref t);
                var w1 = TLookup.Get(Codes256(words, w.Bits, Lanes256[g + 1]), ref t);
                if (dst != null)
                {
                    w0.Store(dst + 32 * k + 8 * g);
                    w1.Store(dst + 32 * k + 8 * g + 8);
                }
                else
                {
                    acc0 = Fma.MultiplyAdd(w0, Vector256.Load(x + 32 * k + 8 * g), acc0);
                    acc1 = Fma.MultiplyAdd(w1, Vector256.Load(x + 32 * k + 8 * g + 8), acc1);
                }
            }
        }
        if (dst != null) { DecodeTail(w, planes, table, dst, full * 32); return 0; }
        return Vector256.Sum(acc0 + acc1) + DotTail(w, planes, table, x, full * 32);
    }
}
