using System.Runtime.CompilerServices;
using System.Numerics.Tensors;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using AnyPrecML.Quantization;

namespace AnyPrecML.Kernels;

/// <summary>Instruction paths of the CPU bitplane kernels.</summary>
public enum KernelPath
{
    /// <summary>Plain C#: the reference every vector path is tested against.</summary>
    Scalar,
    /// <summary>128-bit vectors (SSE, ARM64 AdvSimd); table lookups are scalar loads.</summary>
    Vector128,
    /// <summary>256-bit AVX2 + FMA; lookups by vpermps (b ≤ 4) or gathers.</summary>
    Vector256,
    /// <summary>512-bit AVX-512; with GFNI and VBMI, 64 codes at a time by an 8×8 bit transpose; lookups by vpermps/vpermt2ps or gathers.</summary>
    Vector512,
}

/// <summary>The raw view of one b-bit operand the kernels read: b planes and the b-bit table.</summary>
internal readonly unsafe struct BitplaneOperand
{
    public readonly uint* Planes;   // plane 0, row 0
    public readonly Half* Table;    // b-bit table, row 0
    public readonly int Rows, Cols, Words, Bits;
    public readonly long PlaneStride; // words from one plane to the next: plane rows (padding included) × words

    public BitplaneOperand(BitplaneMatrix m, int bits)
    {
        m.CheckBits(bits);
        Planes = m.PlanesPointer; Table = m.TablePointer(bits);
        Rows = m.Rows; Cols = m.Cols; Words = m.WordsPerRow; Bits = bits;
        PlaneStride = m.PlaneStride;
    }
}

/// <summary>
/// CPU kernels for y = W_b · x on a bitplane matrix: for every row, the b-bit code of each element is
/// assembled from planes 0..b-1 (most significant first), looked up in the row's b-bit table and
/// multiplied into x, with fp32 accumulation. One scalar reference and one implementation per vector
/// width (as TensorPrimitives does), chosen once for the CPU at hand. For one token (decode) the lookup
/// feeds a fused multiply-add directly; for several tokens each row is decoded once into fp32 and
/// reused for every token (dense dot products).
/// </summary>
public static unsafe partial class BitplaneKernels
{
    /// <summary>The widest path this CPU runs.</summary>
    public static KernelPath Best { get; } =
        IsSupported(KernelPath.Vector512) ? KernelPath.Vector512 :
        IsSupported(KernelPath.Vector256) ? KernelPath.Vector256 :
        IsSupported(KernelPath.Vector128) ? KernelPath.Vector128 : KernelPath.Scalar;

    /// <summary>True when <paramref name="path"/> can run here.</summary>
    public static bool IsSupported(KernelPath path) => path switch
    {
        KernelPath.Scalar => true,
        KernelPath.Vector128 => Vector128.IsHardwareAccelerated,
        KernelPath.Vector256 => Vector256.IsHardwareAccelerated && Avx2.IsSupported && Fma.IsSupported,
        KernelPath.Vector512 => Vector512.IsHardwareAccelerated && Avx512F.IsSupported && Avx512BW.IsSupported,
        _ => false,
    };

    /// <summary>Every path that can run here, narrowest first.</summary>
    public static IReadOnlyList<KernelPath> SupportedPaths => Enum.GetValues<KernelPath>().Where(IsSupported).ToArray();

    /// <summary>True when the 512-bit path decodes with GFNI + VBMI (else it decodes lane by lane).</summary>
    public static bool UsesGfni => Gfni.V512.IsSupported && Avx512Vbmi.IsSupported;

    /// <summary>Floats of scratch one thread needs for a matrix of <paramref name="cols"/> columns.</summary>
    internal static int ScratchFloats(int cols) => 256 + cols;

    /// <summary>
    /// y[t, r] = Σ_j W_b[r, j] · x[t, j] for rows [rowStart, rowEnd) and tokens t &lt; m; x is [m, cols] in the
    /// path's column order (<see cref="PermutesColumns"/>), y is [m, rows], both row-major.
    /// <paramref name="scratch"/> holds <see cref="ScratchFloats"/> floats.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static void Rows(KernelPath path, in BitplaneOperand w, float* x, int m, float* y, int rowStart, int rowEnd, float* scratch)
    {
        int k = 1 << w.Bits;
        float* table = scratch, row = scratch + 256;
        for (int r = rowStart; r < rowEnd; r++)
        {
            TensorPrimitives.ConvertToSingle(new ReadOnlySpan<Half>(w.Table + (long)r * k, k), new Span<float>(table, k));
            uint* planes = w.Planes + (long)r * w.Words;
            if (m == 1)
            {
                y[r] = path switch
                {
                    KernelPath.Vector512 => Row512(w, planes, table, x, null),
                    KernelPath.Vector256 => Row256(w, planes, table, x, null),
                    KernelPath.Vector128 => Dot128(w, planes, table, x),
                    _ => DotScalar(w, planes, table, x),
                };
                continue;
            }
            switch (path)
            {
                case KernelPath.Vector512: Row512(w, planes, table, null, row); break;
                case KernelPath.Vector256: Row256(w, planes, table, null, row); break;
                case KernelPath.Vector128: Decode128(w, planes, table, row); break;
                default: DecodeScalar(w, planes, table, row); break;
            }
            var decoded = new ReadOnlySpan<float>(row, w.Cols);
            for (int t = 0; t < m; t++) y[(long)t * w.Rows + r] = TensorPrimitives.Dot(decoded, new ReadOnlySpan<float>(x + (long)t * w.Cols, w.Cols));
        }
    }

    // ------------------------------------------------------------------ scalar reference

    /// <summary>The b-bit code of element e (0..31) of word <paramref name="word"/> of a row.</summary>
    private static int Code(in BitplaneOperand w, uint* planes, int word, int e)
    {
        int code = 0;
        for (int p = 0; p < w.Bits; p++) code = (code << 1) | (int)((planes[p * w.PlaneStride + word] >> e) & 1);
        return code;
    }

    private static float DotScalar(in BitplaneOperand w, uint* planes, float* table, float* x)
    {
        float acc = 0;
        for (int j = 0; j < w.Cols; j++) acc += table[Code(w, planes, j >> 5, j & 31)] * x[j];
        return acc;
    }

    private static void DecodeScalar(in BitplaneOperand w, uint* planes, float* table, float* dst)
    {
        for (int j = 0; j < w.Cols; j++) dst[j] = table[Code(w, planes, j >> 5, j & 31)];
    }

    /// <summary>Scalar tail: elements [from, cols) for the paths whose vector loops stop at whole words.</summary>
    private static float DotTail(in BitplaneOperand w, uint* planes, float* table, float* x, int from)
    {
        float acc = 0;
        for (int j = from; j < w.Cols; j++) acc += table[Code(w, planes, j >> 5, j & 31)] * x[j];
        return acc;
    }

    private static void DecodeTail(in BitplaneOperand w, uint* planes, float* table, float* dst, int from)
    {
        for (int j = from; j < w.Cols; j++) dst[j] = table[Code(w, planes, j >> 5, j & 31)];
    }
}
