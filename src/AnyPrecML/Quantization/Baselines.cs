using AnyPrecML.Models;

namespace AnyPrecML.Quantization;

/// <summary>What each bit-width would be if deployed separately: the comparison columns of the quality table.</summary>
public static class Baselines
{
    /// <summary>
    /// Independent: a separate b-bit model, each row clustered on its own into 2^b centroids by
    /// <paramref name="method"/> (default: the exactly optimal sensitivity-weighted k-means, the best
    /// any independent non-uniform b-bit model can do on this objective), centroids rounded to fp16 as
    /// stored. Returns the dequantized [rows, cols] weight.
    /// </summary>
    public static float[] Independent(float[] weight, int rows, int cols, LayerSensitivity sensitivity, int bits, ulong seed, SeedMethod method = SeedMethod.Exact)
    {
        var result = new float[weight.Length];
        Parallel.For(0, rows, r =>
        {
            var (codes, centroids) = RowQuantizer.Cluster(weight.AsSpan(r * cols, cols), sensitivity.Row(r), 1 << bits, method, SplitMix64.Derive(seed, (ulong)r));
            for (int j = 0; j < cols; j++) result[r * cols + j] = (float)(Half)centroids[codes[j]];
        });
        return result;
    }

    /// <summary>
    /// Round-to-nearest: per row, asymmetric min-max uniform quantization to 2^b levels
    /// (scale = (max - min) / (2^b - 1), levels min + q·scale). Returns the dequantized weight.
    /// </summary>
    public static float[] RoundToNearest(float[] weight, int rows, int cols, int bits)
    {
        var result = new float[weight.Length];
        int levels = (1 << bits) - 1;
        for (int r = 0; r < rows; r++)
        {
            var row = weight.AsSpan(r * cols, cols);
            float min = System.Numerics.Tensors.TensorPrimitives.Min(row), max = System.Numerics.Tensors.TensorPrimitives.Max(row);
            float scale = (max - min) / levels;
            for (int j = 0; j < cols; j++)
            {
                float q = scale > 0 ? MathF.Round((row[j] - min) / scale) : 0;
                result[r * cols + j] = min + Math.Clamp(q, 0, levels) * scale;
            }
        }
        return result;
    }
}
