using System.Numerics.Tensors;
using System.Runtime.InteropServices;
using AnyPrecML.Models;

namespace AnyPrecML.Kernels;

/// <summary>
/// A dense matrix of signed bytes with one fp32 scale per row: W ≈ Scale[r]·Q[r, j], |Q| ≤ 127 (symmetric, round half
/// to even). It holds the LM head for the int8 level: the head is no bitplane matrix (the paper keeps it in 16 bits),
/// and in fp32 it was the largest single read of a decode step (TinyLlama: 32000×2048, 262 MB per token, 4× the int8
/// bytes). Rows are padded with zeros to <see cref="Stride"/> bytes so every vector load is whole.
/// </summary>
public sealed class Int8Matrix
{
    private Int8Matrix(string name, int rows, int cols, sbyte[] values, float[] scale)
    {
        Name = name; Rows = rows; Cols = cols; Values = values; Scale = scale;
    }

    /// <summary>The tensor's name, for messages.</summary>
    public string Name { get; }

    /// <summary>Output rows.</summary>
    public int Rows { get; }

    /// <summary>Input columns.</summary>
    public int Cols { get; }

    /// <summary>Bytes from one row to the next: <see cref="Cols"/> rounded up to 32 (one 256-bit load).</summary>
    public int Stride => StrideOf(Cols);

    /// <summary>The bytes, [rows, stride] (pinned, with 64 bytes of zero after the last row).</summary>
    internal sbyte[] Values { get; }

    /// <summary>Per-row scales: W[r, j] ≈ Scale[r]·Values[r, j].</summary>
    internal float[] Scale { get; }

    /// <summary>Bytes held (values and scales).</summary>
    public long Bytes => Values.LongLength + 4L * Scale.Length;

    internal static int StrideOf(int cols) => (cols + 31) & ~31;

    /// <summary>Quantizes the fp32 matrix <paramref name="weights"/> ([rows, cols], row-major), rows in parallel.</summary>
    public static Int8Matrix Quantize(string name, float[] weights, int rows, int cols)
    {
        ArgumentNullException.ThrowIfNull(weights);
        if (weights.LongLength != (long)rows * cols) throw new ArgumentException($"{name}: {weights.LongLength} values for a {rows}×{cols} matrix.", nameof(weights));
        return Quantize(name, rows, cols, (r, row) => weights.AsSpan(r * cols, cols).CopyTo(row));
    }

    /// <summary>
    /// Quantizes a 2-D checkpoint tensor (F32, F16 or BF16) row by row, each row widened to fp32 on its own: no fp32 copy
    /// of the whole matrix (a 32000×2048 bf16 head was a 262 MB array, written once and read once).
    /// </summary>
    public static Int8Matrix Quantize(TensorView weights)
    {
        ArgumentNullException.ThrowIfNull(weights);
        if (weights.Shape.Count != 2) throw new ArgumentException($"{weights.Name} has {weights.Shape.Count} dimensions, not 2.", nameof(weights));
        if (weights.DType is not (DType.F32 or DType.F16 or DType.BF16))
            throw new ModelFormatException($"{weights.FilePath}: tensor '{weights.Name}' is {weights.DType.Name()}; a floating-point tensor (F32, F16, BF16) was expected.");
        int rows = checked((int)weights.Shape[0]), cols = checked((int)weights.Shape[1]);
        return Quantize(weights.Name, rows, cols, (r, row) => weights.CopyTo((long)r * cols, row));
    }

    private static Int8Matrix Quantize(string name, int rows, int cols, Action<int, float[]> readRow)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(rows, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(cols, 1);
        int stride = StrideOf(cols);
        var values = GC.AllocateArray<sbyte>(checked(rows * stride + 64), pinned: true);
        var scale = new float[rows];
        var nonFinite = new bool[rows];
        // The activation quantizer's rule (max|w|/127, round half to even) is the one wanted per row. max|w| is NaN or
        // infinite exactly when the row holds a NaN or an infinity (the quantizer's own scale turns a NaN maximum into 1).
        Parallel.For(0, rows, () => new float[cols], (r, _, row) =>
        {
            readRow(r, row);
            if (!float.IsFinite(TensorPrimitives.MaxMagnitude(row))) { nonFinite[r] = true; return row; }
            scale[r] = BitplaneKernels.QuantizeActivations(row, values.AsSpan(r * stride, cols), default, default, Int8ColumnOrder.Natural).Scale;
            return row;
        }, _ => { });
        int bad = Array.IndexOf(nonFinite, true);
        if (bad >= 0) throw new ArgumentException($"{name} holds a non-finite value (row {bad}).");
        return new Int8Matrix(name, rows, cols, values, scale);
    }

    /// <summary>Row <paramref name="r"/> dequantized (for tests and references).</summary>
    public float[] DequantizeRow(int r)
    {
        var row = new float[Cols];
        for (int j = 0; j < Cols; j++) row[j] = Scale[r] * Values[r * Stride + j];
        return row;
    }
}
