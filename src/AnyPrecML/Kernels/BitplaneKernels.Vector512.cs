using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace AnyPrecML.Kernels;

public static unsafe partial class BitplaneKernels
{
    private static readonly Vector512<uint>[] Lanes512 = Enumerable.Range(0, 2)
        .Select(g => Vector512.Create(Enumerable.Range(0, 16).Select(i => 1u << (16 * g + i)).ToArray())).ToArray();

    // gf2p8affineqb operand whose byte i is 1 << i: with a qword of eight plane bytes as the matrix,
    // it transposes the 8×8 bits, giving eight codes (plane 0 the most significant bit).
    private static readonly Vector512<byte> BitIdentity = Vector512.Create(0x8040201008040201UL).AsByte();

    /// <summary>Elements per block of the GFNI decoder: 16 plane words.</summary>
    internal const int GfniBlock = 512;

    /// <summary>
    /// The column order of a GFNI block: code byte (register o, byte 8q+i) after <see cref="TransposeBytes"/>
    /// is element 8·ByteOrigin[8o+q]+i of the block. A dot product does not care about order, so x is
    /// permuted once per call to match instead of putting the codes back in order.
    /// </summary>
    private static readonly byte[] ByteOrigin = ComputeByteOrigin();

    /// <summary>True when the 512-bit path decodes with GFNI (and so reads x in <see cref="PermuteColumns"/> order).</summary>
    internal static bool PermutesColumns(KernelPath path) => path == KernelPath.Vector512 && UsesGfni;

    /// <summary>
    /// Interleaves eight plane registers (64 bytes each, byte k = elements 8k..8k+7) so each qword holds the
    /// same byte k of all eight: three unpack stages (bytes, words, dwords) within 128-bit lanes.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void TransposeBytes(Vector512<byte> s0, Vector512<byte> s1, Vector512<byte> s2, Vector512<byte> s3,
        Vector512<byte> s4, Vector512<byte> s5, Vector512<byte> s6, Vector512<byte> s7, Vector512<byte>* c)
    {
        var a0 = Avx512BW.UnpackLow(s0, s1).AsUInt16(); var a1 = Avx512BW.UnpackHigh(s0, s1).AsUInt16();
        var a2 = Avx512BW.UnpackLow(s2, s3).AsUInt16(); var a3 = Avx512BW.UnpackHigh(s2, s3).AsUInt16();
        var a4 = Avx512BW.UnpackLow(s4, s5).AsUInt16(); var a5 = Avx512BW.UnpackHigh(s4, s5).AsUInt16();
        var a6 = Avx512BW.UnpackLow(s6, s7).AsUInt16(); var a7 = Avx512BW.UnpackHigh(s6, s7).AsUInt16();
        var b0 = Avx512BW.UnpackLow(a0, a2).AsUInt32(); var b1 = Avx512BW.UnpackHigh(a0, a2).AsUInt32();
        var b2 = Avx512BW.UnpackLow(a1, a3).AsUInt32(); var b3 = Avx512BW.UnpackHigh(a1, a3).AsUInt32();
        var b4 = Avx512BW.UnpackLow(a4, a6).AsUInt32(); var b5 = Avx512BW.UnpackHigh(a4, a6).AsUInt32();
        var b6 = Avx512BW.UnpackLow(a5, a7).AsUInt32(); var b7 = Avx512BW.UnpackHigh(a5, a7).AsUInt32();
        c[0] = Avx512F.UnpackLow(b0, b4).AsByte(); c[1] = Avx512F.UnpackHigh(b0, b4).AsByte();
        c[2] = Avx512F.UnpackLow(b1, b5).AsByte(); c[3] = Avx512F.UnpackHigh(b1, b5).AsByte();
        c[4] = Avx512F.UnpackLow(b2, b6).AsByte(); c[5] = Avx512F.UnpackHigh(b2, b6).AsByte();
        c[6] = Avx512F.UnpackLow(b3, b7).AsByte(); c[7] = Avx512F.UnpackHigh(b3, b7).AsByte();
    }

    private static byte[] ComputeByteOrigin()
    {
        var origin = new byte[64];
        if (!UsesGfni) return origin;
        // Run the transpose on registers whose byte k holds k: each output qword then names its source byte.
        var k = Vector512.Create(Enumerable.Range(0, 64).Select(i => (byte)i).ToArray());
        var c = stackalloc Vector512<byte>[8];
        TransposeBytes(k, k, k, k, k, k, k, k, c);
        for (int o = 0; o < 8; o++)
            for (int q = 0; q < 8; q++) origin[8 * o + q] = c[o].GetElement(8 * q);
        return origin;
    }

    /// <summary>Copies one token's x into the kernel's column order: permuted inside whole GFNI blocks, as is after.</summary>
    internal static void PermuteColumns(ReadOnlySpan<float> x, Span<float> dst, int cols)
    {
        int blocks = cols / 32 / 16;
        for (int b = 0; b < blocks; b++)
        {
            int start = b * GfniBlock;
            for (int g = 0; g < 64; g++)
                x.Slice(start + 8 * ByteOrigin[g], 8).CopyTo(dst.Slice(start + 8 * g, 8));
        }
        x[(blocks * GfniBlock)..cols].CopyTo(dst[(blocks * GfniBlock)..cols]);
    }

    /// <summary>The row's table, filled through a pointer (the whole struct is the 256-entry table for b = 8).</summary>
#pragma warning disable CS0649 // assigned through a pointer in Row512
    private struct Table512
    {
        public Vector512<float> T0, T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12, T13, T14, T15;
    }
#pragma warning restore CS0649

    private interface ILookup512
    {
        static abstract Vector512<float> Get(Vector512<int> code, ref Table512 t);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Pick(Vector512<int> code, int bit, Vector512<float> ifSet, Vector512<float> ifClear) =>
        Vector512.ConditionalSelect(Vector512.Equals(code & Vector512.Create(bit), Vector512.Create(bit)).AsSingle(), ifSet, ifClear);

    /// <summary>b ≤ 4: vpermps over the 16-entry table.</summary>
    private struct PermuteOne : ILookup512
    {
        public static Vector512<float> Get(Vector512<int> code, ref Table512 t) => Avx512F.PermuteVar16x32(t.T0, code);
    }

    /// <summary>b = 5: vpermt2ps over two registers.</summary>
    private struct Permute32 : ILookup512
    {
        public static Vector512<float> Get(Vector512<int> code, ref Table512 t) => Avx512F.PermuteVar16x32x2(t.T0, code, t.T1);
    }

    /// <summary>b = 6: two vpermt2ps, picked by bit 5.</summary>
    private struct Permute64 : ILookup512
    {
        public static Vector512<float> Get(Vector512<int> code, ref Table512 t) =>
            Pick(code, 32, Avx512F.PermuteVar16x32x2(t.T2, code, t.T3), Avx512F.PermuteVar16x32x2(t.T0, code, t.T1));
    }

    /// <summary>b = 7: four vpermt2ps, picked by bits 5 and 6.</summary>
    private struct Permute128 : ILookup512
    {
        public static Vector512<float> Get(Vector512<int> code, ref Table512 t) => Pick(code, 64,
            Pick(code, 32, Avx512F.PermuteVar16x32x2(t.T6, code, t.T7), Avx512F.PermuteVar16x32x2(t.T4, code, t.T5)),
            Pick(code, 32, Avx512F.PermuteVar16x32x2(t.T2, code, t.T3), Avx512F.PermuteVar16x32x2(t.T0, code, t.T1)));
    }

    /// <summary>
    /// b = 8: two 8-lane gathers from the row's table (in L1). A tree of eight vpermt2ps needs sixteen table
    /// registers and spilled (8.2 ms against 5.5 ms at 4096×4096); .NET exposes no 512-bit gather.
    /// </summary>
    private struct Gather256x2 : ILookup512
    {
        public static Vector512<float> Get(Vector512<int> code, ref Table512 t)
        {
            float* table = (float*)Unsafe.AsPointer(ref t);
            return Vector512.Create(Avx2.GatherVector256(table, code.GetLower(), 4), Avx2.GatherVector256(table, code.GetUpper(), 4));
        }
    }

    /// <summary>One row through the lookup that suits b: the dot product with x, or (x null) the weights decoded into dst.</summary>
    private static float Row512(in BitplaneOperand w, uint* planes, float* table, float* x, float* dst) => w.Bits switch
    {
        <= 4 => Row512<PermuteOne>(w, planes, table, x, dst),
        5 => Row512<Permute32>(w, planes, table, x, dst),
        6 => Row512<Permute64>(w, planes, table, x, dst),
        7 => Row512<Permute128>(w, planes, table, x, dst),
        _ => Row512<Gather256x2>(w, planes, table, x, dst),
    };

    private static Vector512<int> Codes512(Vector512<uint>* words, int bits, Vector512<uint> lane)
    {
        var code = Vector512<int>.Zero;
        for (int p = 0; p < bits; p++) code = code + code - Vector512.Equals(words[p] & lane, lane).AsInt32();
        return code;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<byte> PlaneBlock(uint* planes, long stride, int slot, int empty, int word) =>
        slot < empty ? Vector512<byte>.Zero : Vector512.Load((byte*)(planes + (slot - empty) * stride + word));

    /// <summary>
    /// One row: with <paramref name="x"/>, the dot product; with <paramref name="dst"/>, the decoded weights.
    /// Inside whole GFNI blocks both are in <see cref="PermuteColumns"/> order; the rest is in column order.
    /// </summary>
    [SkipLocalsInit]
    private static float Row512<TLookup>(in BitplaneOperand w, uint* planes, float* table, float* x, float* dst) where TLookup : struct, ILookup512
    {
        int k = 1 << w.Bits;
        Table512 t = default;
        // The table padded to a multiple of 16 entries (b = 3 uses half of T0; the rest is never indexed).
        var tv = (Vector512<float>*)Unsafe.AsPointer(ref t);
        if (k < 16) tv[0] = Vector512.Create(Vector256.Load(table), Vector256<float>.Zero);
        else for (int i = 0; i < k / 16; i++) tv[i] = Vector512.Load(table + 16 * i);

        var acc0 = Vector512<float>.Zero;
        var acc1 = Vector512<float>.Zero;
        int full = w.Cols >> 5, word = 0;

        if (UsesGfni)
        {
            // Slot s (of 8) holds plane s - (8 - b); slots below stay zero, so the transposed bits come out
            // as the b-bit code directly.
            int empty = 8 - w.Bits;
            long stride = w.PlaneStride;
            var c = stackalloc Vector512<byte>[8];
            for (; word + 16 <= full; word += 16)
            {
                TransposeBytes(PlaneBlock(planes, stride, 0, empty, word), PlaneBlock(planes, stride, 1, empty, word),
                    PlaneBlock(planes, stride, 2, empty, word), PlaneBlock(planes, stride, 3, empty, word),
                    PlaneBlock(planes, stride, 4, empty, word), PlaneBlock(planes, stride, 5, empty, word),
                    PlaneBlock(planes, stride, 6, empty, word), PlaneBlock(planes, stride, 7, empty, word), c);
                for (int o = 0; o < 8; o++)
                {
                    var codes = Gfni.V512.GaloisFieldAffineTransform(BitIdentity, c[o], 0);
                    int j = 32 * word + 64 * o;
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
