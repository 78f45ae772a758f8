using AnyPrecML.Kernels;

namespace AnyPrecML.Tests;

[TestClass]
public sealed unsafe class CausalAttentionTests
{
    [TestMethod]
    [DataRow(4, 2, 16, false, 0, 7, DisplayName = "prompt, 2 query heads per KV head, half-split")]
    [DataRow(4, 4, 8, true, 0, 1, DisplayName = "first token, one query head per KV head, interleaved")]
    [DataRow(8, 2, 64, true, 37, 1, DisplayName = "decode step after 37 positions")]
    [DataRow(8, 2, 64, false, 37, 5, DisplayName = "verification pass of 5 after 37")]
    [DataRow(6, 3, 12, false, 101, 3, DisplayName = "head width 12: the vector loops' tails")]
    [DataRow(4, 2, 16, false, 0, 40, DisplayName = "prompt of 40: the blocked products, 32 query rows per block")]
    [DataRow(8, 1, 32, true, 13, 21, DisplayName = "chunk of 21 after 13, 8 query heads per KV head: blocks of 8 tokens")]
    [DataRow(3, 3, 16, false, 5, 9, DisplayName = "9 tokens, one query head per KV head: row tiles across tokens")]
    [DataRow(4, 2, 16, false, 3, 30, 16f, DisplayName = "blocked products with scores past 88")]
    [DataRow(4, 2, 16, true, 20, 2, 16f, DisplayName = "scores past 88, where e^x overflows float: the softmax subtracts the maximum")]
    [DataRow(8, 2, 64, false, 150, 1, DisplayName = "decode after 150: keys in chunks of 64, eight and four at a time and single")]
    [DataRow(6, 2, 48, true, 200, 1, DisplayName = "head width 48 after 200: value groups of four vectors and single vectors, chunks of 84")]
    [DataRow(8, 2, 64, true, 300, 3, DisplayName = "verification pass of 3 after 300: every token's chunks")]
    public void MatchesAFloat64ReferenceAndAppendsTheNewRowsInPlace(int heads, int kvHeads, int hd, bool interleaved, int past, int tokens, float magnitude = 1)
    {
        var shape = new CausalAttention.Shape(heads, kvHeads, hd, interleaved);
        int capacity = past + tokens + 3, half = hd / 2;
        var rng = new Random(heads * 1000 + past);
        float Next() => (float)(rng.NextDouble() * 2 - 1) * magnitude;
        var qkv = new float[tokens * shape.PackedWidth];
        for (int i = 0; i < qkv.Length; i++) qkv[i] = Next();
        var keys = new float[kvHeads * capacity * hd];
        var values = new float[keys.Length];
        for (int g = 0; g < kvHeads; g++)
            for (int p = 0; p < past; p++)
                for (int i = 0; i < hd; i++) { keys[(g * capacity + p) * hd + i] = Next(); values[(g * capacity + p) * hd + i] = Next(); }
        var cos = new float[capacity * half];
        var sin = new float[capacity * half];
        for (int p = 0; p < capacity; p++)
            for (int j = 0; j < half; j++)
            {
                double angle = p * Math.Pow(10000, -2.0 * j / hd);
                cos[p * half + j] = (float)Math.Cos(angle);
                sin[p * half + j] = (float)Math.Sin(angle);
            }
        float scale = 1f / MathF.Sqrt(hd);
        var (expected, expectedKeys, expectedValues, maxScore) = Reference(shape, qkv, tokens, keys, values, capacity, past, cos, sin, scale);

        var output = new float[tokens * heads * hd];
        Array.Fill(output, float.NaN); // every output must be written, not accumulated onto what was there
        using var pool = new KernelThreadPool(2);
        fixed (float* k = keys, v = values)
            CausalAttention.Run(shape, qkv, tokens, k, v, capacity, past, cos, sin, scale, output, pool);

        if (magnitude > 1) Assert.IsGreaterThan(100.0, maxScore, "scores reach where e^x overflows float");
        // Values scale with the magnitude; the scores' float rounding with its square.
        Assert.IsLessThan(1e-5 * magnitude * magnitude * magnitude, TestData.MaxAbsDiff(output, expected), "attention");
        Assert.IsLessThan(1e-6 * magnitude, TestData.MaxAbsDiff(keys, expectedKeys), "keys: the new rows rotated in place, the others untouched");
        CollectionAssert.AreEqual(expectedValues, values, "values: the new rows copied in place, the others untouched");
    }

    [TestMethod]
    public void APastThatLeavesNoRoomForTheNewTokensIsRejected()
    {
        var shape = new CausalAttention.Shape(2, 1, 4, false);
        var keys = new float[8 * 4];
        var values = new float[8 * 4];
        var table = new float[8 * 2];
        using var pool = new KernelThreadPool(1);
        fixed (float* k = keys, v = values)
        {
            float* kp = k, vp = v;
            Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => CausalAttention.Run(shape, new float[2 * shape.PackedWidth], 2, kp, vp, 8, 7, table, table, 0.5f, new float[2 * 8], pool));
        }
    }

    /// <summary>The same attention in float64, written plainly: rotate q and the new k, append k and v, causal softmax attention.</summary>
    private static (float[] Output, float[] Keys, float[] Values, double MaxScore) Reference(CausalAttention.Shape shape, float[] qkv, int tokens, float[] pastKeys, float[] pastValues,
        int capacity, int past, float[] cos, float[] sin, float scale)
    {
        int hd = shape.HeadDim, half = hd / 2, qDim = shape.Heads * hd, kvDim = shape.KvHeads * hd, group = shape.Heads / shape.KvHeads;
        var keys = (float[])pastKeys.Clone();
        var values = (float[])pastValues.Clone();
        var q = new double[tokens * qDim];
        var k = new double[shape.KvHeads * capacity * hd];
        for (int i = 0; i < k.Length; i++) k[i] = keys[i];
        for (int t = 0; t < tokens; t++)
        {
            int pos = past + t, row = t * shape.PackedWidth;
            for (int h = 0; h < shape.Heads + shape.KvHeads; h++)
                for (int j = 0; j < half; j++)
                {
                    int i0 = shape.Interleaved ? 2 * j : j, i1 = shape.Interleaved ? 2 * j + 1 : j + half;
                    double a = qkv[row + h * hd + i0], b = qkv[row + h * hd + i1], c = cos[pos * half + j], s = sin[pos * half + j];
                    double y0 = a * c - b * s, y1 = a * s + b * c;
                    if (h < shape.Heads) { q[t * qDim + h * hd + i0] = y0; q[t * qDim + h * hd + i1] = y1; }
                    else
                    {
                        int at = ((h - shape.Heads) * capacity + pos) * hd;
                        k[at + i0] = y0; k[at + i1] = y1;
                        keys[at + i0] = (float)y0; keys[at + i1] = (float)y1;
                    }
                }
            for (int g = 0; g < shape.KvHeads; g++)
                for (int i = 0; i < hd; i++) values[(g * capacity + pos) * hd + i] = qkv[row + qDim + kvDim + g * hd + i];
        }
        var output = new float[tokens * qDim];
        double maxScore = double.NegativeInfinity;
        for (int t = 0; t < tokens; t++)
            for (int h = 0; h < shape.Heads; h++)
            {
                int g = h / group, length = past + t + 1;
                var scores = new double[length];
                for (int p = 0; p < length; p++)
                {
                    double dot = 0;
                    for (int i = 0; i < hd; i++) dot += q[t * qDim + h * hd + i] * k[(g * capacity + p) * hd + i];
                    scores[p] = dot * scale;
                }
                double max = scores.Max(), sum = 0;
                maxScore = Math.Max(maxScore, max);
                for (int p = 0; p < length; p++) sum += scores[p] = Math.Exp(scores[p] - max);
                for (int i = 0; i < hd; i++)
                {
                    double o = 0;
                    for (int p = 0; p < length; p++) o += scores[p] / sum * values[(g * capacity + p) * hd + i];
                    output[t * qDim + h * hd + i] = (float)o;
                }
            }
        return (output, keys, values, maxScore);
    }
}
