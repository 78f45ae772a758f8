using System.Buffers.Binary;
using System.Numerics;
using System.Numerics.Tensors;

namespace AnyPrecML.Models;

/// <summary>Element types of stored tensors (the safetensors names).</summary>
public enum DType { F32, F16, BF16, F64, I64, I32, I16, I8, U8, U16, U32, U64, Bool }

/// <summary>Sizes and names of <see cref="DType"/>s.</summary>
public static class DTypes
{
    /// <summary>Bytes per element.</summary>
    public static int Size(this DType t) => t switch
    {
        DType.F64 or DType.I64 or DType.U64 => 8,
        DType.F32 or DType.I32 or DType.U32 => 4,
        DType.F16 or DType.BF16 or DType.I16 or DType.U16 => 2,
        _ => 1,
    };

    /// <summary>The safetensors spelling ("F32", "BF16", "BOOL", ...).</summary>
    public static string Name(this DType t) => t == DType.Bool ? "BOOL" : t.ToString().ToUpperInvariant();

    /// <summary>Parses a safetensors dtype name; null when unknown.</summary>
    public static DType? Parse(string name) => name switch
    {
        "F32" => DType.F32, "F16" => DType.F16, "BF16" => DType.BF16, "F64" => DType.F64,
        "I64" => DType.I64, "I32" => DType.I32, "I16" => DType.I16, "I8" => DType.I8,
        "U8" => DType.U8, "U16" => DType.U16, "U32" => DType.U32, "U64" => DType.U64, "BOOL" => DType.Bool,
        _ => null,
    };
}

/// <summary>
/// A stored tensor: its type and shape, and its bytes where they lie (usually a memory-mapped file).
/// Reading it copies nothing until <see cref="CopyTo(Span{float})"/> or <see cref="ToFloatArray"/> converts it.
/// </summary>
public sealed class TensorView
{
    private readonly MappedFile _file;
    private readonly long _offset;

    internal TensorView(string name, DType dtype, long[] shape, MappedFile file, long offset)
    {
        Name = name; DType = dtype; Shape = shape; _file = file; _offset = offset;
        ElementCount = CheckedElementCount(shape) ?? throw new ModelFormatException($"{file.Path}: tensor '{name}' has an invalid shape.");
    }

    /// <summary>Tensor name, in Hugging Face naming (model.layers.0.self_attn.q_proj.weight).</summary>
    public string Name { get; }
    /// <summary>Element type as stored.</summary>
    public DType DType { get; }
    /// <summary>Shape, outermost first.</summary>
    public IReadOnlyList<long> Shape { get; }
    /// <summary>Number of elements.</summary>
    public long ElementCount { get; }
    /// <summary>Number of bytes as stored.</summary>
    public long ByteLength => ElementCount * DType.Size();
    /// <summary>The file the bytes live in.</summary>
    public string FilePath => _file.Path;

    /// <summary>The stored bytes, straight from the mapping (valid while the checkpoint is open).</summary>
    public ReadOnlySpan<byte> Bytes => _file.Slice(_offset, ByteLength, Name);

    /// <summary>Where the tensor's bytes start in <see cref="FilePath"/>.</summary>
    internal long FileOffset => _offset;

    /// <summary>Product of the dimensions, or null when negative or overflowing.</summary>
    internal static long? CheckedElementCount(IReadOnlyList<long> shape)
    {
        long n = 1;
        foreach (long d in shape)
        {
            if (d < 0) return null;
            try { n = checked(n * d); } catch (OverflowException) { return null; }
        }
        return n;
    }

    /// <summary>Throws unless the shape is exactly <paramref name="expected"/>.</summary>
    public TensorView Expect(params long[] expected)
    {
        if (!Shape.SequenceEqual(expected))
            throw new ModelFormatException($"{FilePath}: tensor '{Name}' has shape [{string.Join(", ", Shape)}], expected [{string.Join(", ", expected)}].");
        return this;
    }

    /// <summary>Index of the first NaN or ±Inf element of a floating-point tensor (F32, F16, BF16, F64); -1 when all are finite or the tensor is not floating-point.</summary>
    public long IndexOfNonFinite()
    {
        // A float is non-finite exactly when its exponent bits are all ones; the check reads the mapped bytes in
        // chunks (tensors over 2 GiB included) without converting them.
        (ulong mask, int size) = DType switch
        {
            DType.F32 => (0x7F80_0000UL, 4),
            DType.F16 => (0x7C00UL, 2),
            DType.BF16 => (0x7F80UL, 2),
            DType.F64 => (0x7FF0_0000_0000_0000UL, 8),
            _ => (0UL, 0),
        };
        if (size == 0) return -1;
        const long Chunk = 1L << 28;
        for (long start = 0; start < ByteLength; start += Chunk)
        {
            var bytes = _file.Slice(_offset + start, Math.Min(Chunk, ByteLength - start), Name);
            int i = size switch
            {
                2 => IndexOfExponentAllOnes(System.Runtime.InteropServices.MemoryMarshal.Cast<byte, ushort>(bytes), (ushort)mask),
                4 => IndexOfExponentAllOnes(System.Runtime.InteropServices.MemoryMarshal.Cast<byte, uint>(bytes), (uint)mask),
                _ => IndexOfExponentAllOnes(System.Runtime.InteropServices.MemoryMarshal.Cast<byte, ulong>(bytes), mask),
            };
            if (i >= 0) return start / size + i;
        }
        return -1;
    }

    private static int IndexOfExponentAllOnes<T>(ReadOnlySpan<T> bits, T mask) where T : unmanaged, System.Numerics.IBinaryInteger<T>
    {
        int i = 0;
        if (System.Numerics.Vector.IsHardwareAccelerated && bits.Length >= System.Numerics.Vector<T>.Count)
        {
            var m = new System.Numerics.Vector<T>(mask);
            var vectors = System.Runtime.InteropServices.MemoryMarshal.Cast<T, System.Numerics.Vector<T>>(bits);
            for (; i < vectors.Length; i++)
                if (System.Numerics.Vector.EqualsAny(vectors[i] & m, m)) break;
            i *= System.Numerics.Vector<T>.Count;
        }
        for (; i < bits.Length; i++)
            if ((bits[i] & mask) == mask) return i;
        return -1;
    }

    /// <summary>Throws <see cref="ModelFormatException"/> naming this tensor and its first NaN or ±Inf element, if it has one.</summary>
    public TensorView ExpectFinite()
    {
        long i = IndexOfNonFinite();
        if (i >= 0) throw new ModelFormatException($"{FilePath}: tensor '{Name}' holds a non-finite value (NaN or ±Inf) at flat index {i}{IndexInShape(i)}.");
        return this;
    }

    private string IndexInShape(long flat)
    {
        if (Shape.Count < 2) return "";
        var idx = new long[Shape.Count];
        for (int d = Shape.Count - 1; d >= 0; d--) { idx[d] = flat % Shape[d]; flat /= Shape[d]; }
        return $" [{string.Join(", ", idx)}]";
    }

    /// <summary>Converts the elements (F32, F16 or BF16) to fp32 into <paramref name="destination"/>.</summary>
    public void CopyTo(Span<float> destination)
    {
        if (destination.Length != ElementCount)
            throw new ArgumentException($"destination holds {destination.Length} floats, tensor '{Name}' has {ElementCount}.", nameof(destination));
        CopyTo(0, destination);
    }

    /// <summary>
    /// Converts elements [<paramref name="start"/>, <paramref name="start"/> + destination length) (F32, F16 or BF16) to
    /// fp32: a row at a time, where a whole fp32 copy of a large tensor is not wanted.
    /// </summary>
    public void CopyTo(long start, Span<float> destination)
    {
        if (start < 0 || start > ElementCount - destination.Length)
            throw new ArgumentOutOfRangeException(nameof(start), start, $"elements [{start}, {start + destination.Length}) are outside tensor '{Name}' of {ElementCount}.");
        int size = DType.Size();
        ReadOnlySpan<byte> src = _file.Slice(_offset + start * size, (long)destination.Length * size, Name);
        switch (DType)
        {
            case DType.F32:
                if (BitConverter.IsLittleEndian) System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(src).CopyTo(destination);
                else for (int i = 0; i < destination.Length; i++) destination[i] = BinaryPrimitives.ReadSingleLittleEndian(src[(4 * i)..]);
                break;
            case DType.F16:
                TensorPrimitives.ConvertToSingle(System.Runtime.InteropServices.MemoryMarshal.Cast<byte, Half>(src), destination);
                break;
            case DType.BF16:
                TensorEncoding.WidenBFloat16(System.Runtime.InteropServices.MemoryMarshal.Cast<byte, ushort>(src), destination);
                break;
            default:
                throw new ModelFormatException($"{FilePath}: tensor '{Name}' is {DType.Name()}; a floating-point tensor (F32, F16, BF16) was expected.");
        }
    }

    /// <summary>The elements converted to a new fp32 array.</summary>
    public float[] ToFloatArray()
    {
        if (ElementCount > Array.MaxLength) throw new ModelFormatException($"{FilePath}: tensor '{Name}' has {ElementCount} elements, more than one array can hold.");
        var a = new float[ElementCount];
        CopyTo(a);
        return a;
    }
}
