using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace AnyPrecML.Kernels;

public static unsafe partial class BitplaneKernels
{
    private static readonly Vector512<uint>[] Lanes512 = Enumerable.Range(0, 2)
        .Select(g => Vector512.Create(Enumerable.Range(0, 16).Select(i => 1u << (16 * g + i)).ToArray())).ToArray();

    // vpermb index of the 8×8 byte transpose: destination byte 8k+s takes source byte 8s+k.
    private static readonly Vector512<byte> ByteTranspose = Vector512.Create(Enumerable.Range(0, 64).Select(i => (byte)(8 * (i % 8) + i / 8)).ToArray());

    // gf2p8affineqb operand whose byte i is 1 << i: with a qword of plane bytes as the matrix, it transposes the 8×8 bits.
    private static readonly Vector512<byte> BitIdentity = Vector512.Create(0x8040201008040201UL).AsByte();

    private struct Table512
    {
        public Vector512<float> T0, T1, T2, T3;
        public float* Ptr;
    }

    private interface ILookup512
    {
        static abstract Vector512<float> Get(Vector512<int> code, ref Table512 t);
    }

    /// <summary>b ≤ 4: vpermps over the 16-entry table.</summary>
    private struct Permute16x1 : ILookup512
    {
        public static Vector512<float> Get(Vector512<int> code, ref Table512 t) => Avx512F.PermuteVar16x32(t.T0, code);
    }

    /// <summary>b = 5: vpermt2ps over two registers.</summary>
    private struct Permute16x2 : ILookup512
    {
        public static Vector512<float> Get(Vector512<int> code, ref Table512 t) => Avx512F.PermuteVar16x32x2(t.T0, code, t.T1);
    }

    /// <summary>b = 6: two vpermt2ps, picked by bit 5.</summary>
    private struct Permute16x4 : ILookup512
    {
        public static Vector512<float> Get(Vector512<int> code, ref Table512 t)
        {
            var high = Vector512.Equals(code & Vector512.Create(32), Vector512.Create(32)).AsSingle();
            return Vector512.ConditionalSelect(high, Avx512F.PermuteVar16x32x2(t.T2, code, t.T3), Avx512F.PermuteVar16x32x2(t.T0, code, t.T1));
        }
    }

    /// <summary>b ≥ 7: two 8-lane gathers from the row's table (in L1); .NET exposes no 512-bit gather.</summary>
    private struct Gather512 : ILookup512
    {
        public static Vector512<float> Get(Vector512<int> code, ref Table512 t) =>
            Vector512.Create(Avx2.GatherVector256(t.Ptr, code.GetLower(), 4), Avx2.GatherVector256(t.Ptr, code.GetUpper(), 4));
    }

    // vpermt2q indices of the three stages of an 8×8 qword transpose (bit 3 picks the second source).
    private static readonly Vector512<ulong> Interleave1Lo = Vector512.Create(0UL, 8, 1, 9, 2, 10, 3, 11), Interleave1Hi = Vector512.Create(4UL, 12, 5, 13, 6, 14, 7, 15);
    private static readonly Vector512<ulong> Interleave2Lo = Vector512.Create(0UL, 1, 8, 9, 2, 3, 10, 11), Interleave2Hi = Vector512.Create(4UL, 5, 12, 13, 6, 7, 14, 15);
    private static readonly Vector512<ulong> Interleave4Lo = Vector512.Create(0UL, 1, 2, 3, 8, 9, 10, 11), Interleave4Hi = Vector512.Create(4UL, 5, 6, 7, 12, 13, 14, 15);

    /// <summary>
    /// Transposes 8 registers of 8 qwords: out[g] = (in[0][g], in[1][g], ..., in[7][g]), in three
    /// stages of vpermt2q that interleave qwords, pairs, then quads.
    /// </summary>
    private static void TransposeQwords(Vector512<ulong>* v)
    {
        var a = stackalloc Vector512<ulong>[8];
        for (int i = 0; i < 8; i += 2)
        {
            a[i] = Avx512F.PermuteVar8x64x2(v[i], Interleave1Lo, v[i + 1]);     // (i,i+1) × qwords 0..3
            a[i + 1] = Avx512F.PermuteVar8x64x2(v[i], Interleave1Hi, v[i + 1]); // (i,i+1) × qwords 4..7
        }
        // a[0]: P0,P1 q0..3   a[1]: P0,P1 q4..7   a[2]: P2,P3 q0..3 ...
        var b = stackalloc Vector512<ulong>[8];
        for (int h = 0; h < 2; h++)
            for (int i = 0; i < 8; i += 4)
            {
                b[i + 2 * h] = Avx512F.PermuteVar8x64x2(a[i + h], Interleave2Lo, a[i + 2 + h]);     // P(i..i+3) × two qwords
                b[i + 2 * h + 1] = Avx512F.PermuteVar8x64x2(a[i + h], Interleave2Hi, a[i + 2 + h]);
            }
        // b[0]: P0..3 q0,q1   b[1]: P0..3 q2,q3   b[2]: P0..3 q4,q5   b[3]: P0..3 q6,q7   b[4..7]: P4..7 likewise
        for (int i = 0; i < 4; i++)
        {
            v[2 * i] = Avx512F.PermuteVar8x64x2(b[i], Interleave4Lo, b[i + 4]);     // q(2i) of P0..7
            v[2 * i + 1] = Avx512F.PermuteVar8x64x2(b[i], Interleave4Hi, b[i + 4]); // q(2i+1) of P0..7
        }
    }

    private static float Dot512(in BitplaneOperand w, uint* planes, float* table, float* x) => w.Bits switch
    {
        <= 4 => Row512<Permute16x1>(w, planes, table, x, null),
        5 => Row512<Permute16x2>(w, planes, table, x, null),
        6 => Row512<Permute16x4>(w, planes, table, x, null),
        _ => Row512<Gather512>(w, planes, table, x, null),
    };

    private static void Decode512(in BitplaneOperand w, uint* planes, float* table, float* dst)
    {
        _ = w.Bits switch
        {
            <= 4 => Row512<Permute16x1>(w, planes, table, null, dst),
            5 => Row512<Permute16x2>(w, planes, table, null, dst),
            6 => Row512<Permute16x4>(w, planes, table, null, dst),
            _ => Row512<Gather512>(w, planes, table, null, dst),
        };
    }

    private static Vector512<int> Codes512(Vector512<uint>* words, int bits, Vector512<uint> lane)
    {
        var code = Vector512<int>.Zero;
        for (int p = 0; p < bits; p++) code = code + code - Vector512.Equals(words[p] & lane, lane).AsInt32();
        return code;
    }

    /// <summary>One row: with <paramref name="x"/>, the dot product; with <paramref name="dst"/>, the decoded weights.</summary>
    private static float Row512<TLookup>(in BitplaneOperand w, uint* planes, float* table, float* x, float* dst) where TLookup : struct, ILookup512
    {
        int k = 1 << w.Bits;
        var t = new Table512
        {
            T0 = k >= 16 ? Vector512.Load(table) : Vector512.Create(Vector256.Load(table), Vector256<float>.Zero),
            T1 = k >= 32 ? Vector512.Load(table + 16) : default,
            T2 = k >= 64 ? Vector512.Load(table + 32) : default,
            T3 = k >= 64 ? Vector512.Load(table + 48) : default,
            Ptr = table,
        };
        var acc0 = Vector512<float>.Zero;
        var acc1 = Vector512<float>.Zero;
        int full = w.Cols >> 5, word = 0;

        // Blocks of 16 words (512 elements): GFNI decodes 64 codes per step.
        if (UsesGfni)
        {
            // Slot s (of 8) holds plane s - (8 - b); slots below 8 - b stay zero, so the transposed bits
            // come out as the b-bit code directly (plane 0 the most significant).
            int empty = 8 - w.Bits;
            var slots = stackalloc Vector512<ulong>[8];
            for (; word + 16 <= full; word += 16)
            {
                for (int s = 0; s < 8; s++)
                    slots[s] = s < empty ? Vector512<ulong>.Zero : Vector512.Load((ulong*)(planes + (s - empty) * w.PlaneStride + word));
                TransposeQwords(slots); // slots[g]: the 8 plane qwords of elements 64g..64g+63
                for (int g = 0; g < 8; g++)
                {
                    var codes = Gfni.V512.GaloisFieldAffineTransform(BitIdentity, Avx512Vbmi.PermuteVar64x8(slots[g].AsByte(), ByteTranspose), 0);
                    int j = 32 * word + 64 * g;
                    var q0 = TLookup.Get(Avx512F.ConvertToVector512Int32(codes.GetLower().GetLower()), ref t);
                    var q1 = TLookup.Get(Avx512F.ConvertToVector512Int32(codes.GetLower().GetUpper()), ref t);
                    var q2 = TLookup.Get(Avx512F.ConvertToVector512Int32(codes.GetUpper().GetLower()), ref t);
                    var q3 = TLookup.Get(Avx512F.ConvertToVector512Int32(codes.GetUpper().GetUpper()), ref t);
                    if (dst != null)
                    {
                        q0.Store(dst + j); q1.Store(dst + j + 16); q2.Store(dst + j + 32); q3.Store(dst + j + 48);
                    }
                    else
                    {
                        acc0 = Avx512F.FusedMultiplyAdd(q0, Vector512.Load(x + j), acc0);
                        acc1 = Avx512F.FusedMultiplyAdd(q1, Vector512.Load(x + j + 16), acc1);
                        acc0 = Avx512F.FusedMultiplyAdd(q2, Vector512.Load(x + j + 32), acc0);
                        acc1 = Avx512F.FusedMultiplyAdd(q3, Vector512.Load(x + j + 48), acc1);
                    }
                }
            }
        }

        // Remaining whole words: 16 lanes test one bit each.
        var words = stackalloc Vector512<uint>[8];
        for (; word < full; word++)
        {
            for (int p = 0; p < w.Bits; p++) words[p] = Vector512.Create(planes[p * w.PlaneStride + word]);
            var w0 = TLookup.Get(Codes512(words, w.Bits, Lanes512[0]), ref t);
            var w1 = TLookup.Get(Codes512(words, w.Bits, Lanes512[1]), ref t);
            if (dst != null)
            {
                w0.Store(dst + 32 * word);
                w1.Store(dst + 32 * word + 16);
            }
            else
            {
                acc0 = Avx512F.FusedMultiplyAdd(w0, Vector512.Load(x + 32 * word), acc0);
                acc1 = Avx512F.FusedMultiplyAdd(w1, Vector512.Load(x + 32 * word + 16), acc1);
            }
        }
        if (dst != null) { DecodeTail(w, planes, table, dst, full * 32); return 0; }
        return Vector512.Sum(acc0 + acc1) + DotTail(w, planes, table, x, full * 32);
    }
}
