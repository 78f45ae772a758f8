using System.Runtime.Intrinsics;

namespace AnyPrecML.Kernels;

public static unsafe partial class BitplaneKernels
{
    // Lane i of group g tests bit 4g+i of a plane word.
    private static readonly Vector128<uint>[] Lanes128 = Enumerable.Range(0, 8)
        .Select(g => Vector128.Create(1u << (4 * g), 1u << (4 * g + 1), 1u << (4 * g + 2), 1u << (4 * g + 3))).ToArray();

    /// <summary>Codes of 4 elements: per plane, lanes whose bit is set compare to all-ones (−1), so code = 2·code − cmp.</summary>
    private static Vector128<int> Codes128(Vector128<uint>* words, int bits, Vector128<uint> lane)
    {
        var code = Vector128<int>.Zero;
        for (int p = 0; p < bits; p++) code = code + code - Vector128.Equals(words[p] & lane, lane).AsInt32();
        return code;
    }

    private static Vector128<float> Lookup128(float* table, Vector128<int> c) =>
        Vector128.Create(table[c.GetElement(0)], table[c.GetElement(1)], table[c.GetElement(2)], table[c.GetElement(3)]);

    private static float Dot128(in BitplaneOperand w, uint* planes, float* table, float* x)
    {
        var words = stackalloc Vector128<uint>[8];
        var acc = Vector128<float>.Zero;
        int full = w.Cols >> 5;
        for (int k = 0; k < full; k++)
        {
            for (int p = 0; p < w.Bits; p++) words[p] = Vector128.Create(planes[p * w.PlaneStride + k]);
            float* xk = x + 32 * k;
            for (int g = 0; g < 8; g++)
                acc += Lookup128(table, Codes128(words, w.Bits, Lanes128[g])) * Vector128.Load(xk + 4 * g);
        }
        return Vector128.Sum(acc) + DotTail(w, planes, table, x, full * 32);
    }

    private static void Decode128(in BitplaneOperand w, uint* planes, float* table, float* dst)
    {
        var words = stackalloc Vector128<uint>[8];
        int full = w.Cols >> 5;
        for (int k = 0; k < full; k++)
        {
            for (int p = 0; p < w.Bits; p++) words[p] = Vector128.Create(planes[p * w.PlaneStride + k]);
            for (int g = 0; g < 8; g++) Lookup128(table, Codes128(words, w.Bits, Lanes128[g])).Store(dst + 32 * k + 4 * g);
        }
        DecodeTail(w, planes, table, dst, full * 32);
    }
}
