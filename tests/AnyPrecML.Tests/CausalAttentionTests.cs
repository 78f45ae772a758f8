using AnyPrecML.Generation;
using AnyPrecML.Kernels;
using AnyPrecML.Models;

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
    [DataRow(4, 2, 16, false, 0, 70, DisplayName = "prompt of 70: the blocked products, 32 query rows per block")]
    [DataRow(8, 1, 32, true, 13, 69, DisplayName = "chunk of 69 after 13, 8 query heads per KV head: blocks of 8 tokens")]
    [DataRow(3, 3, 16, false, 5, 67, DisplayName = "67 tokens, one query head per KV head: row tiles across tokens")]
    [DataRow(4, 2, 16, false, 3, 70, 16f, DisplayName = "blocked products with scores past 88")]
    [DataRow(4, 2, 16, true, 20, 2, 16f, DisplayName = "scores past 88, where e^x overflows float: the softmax subtracts the maximum")]
    [DataRow(8, 2, 64, false, 150, 1, DisplayName = "decode after 150: keys in chunks of 64, eight and four at a time and single")]
    [DataRow(6, 2, 48, true, 200, 1, DisplayName = "head width 48 after 200: value groups of four vectors and single vectors, chunks of 84")]
    [DataRow(8, 2, 64, true, 300, 3, DisplayName = "verification pass of 3 after 300: every token's chunks")]
    public void MatchesAFloat64ReferenceAndAppendsTheNewRowsInPlace(int heads, int kvHeads, int hd, bool interleaved, int past, int tokens, float magnitude = 1)
    {
        var shape = new CausalAttention.Shape(heads, kvHeads, hd, interleaved);
        int capacity = past + tokens + 3;
        var rng = new Random(heads * 1000 + past);
        float Next() => (float)(rng.NextDouble() * 2 - 1) * magnitude;
        var qkv = new float[tokens * shape.PackedWidth];
        for (int i = 0; i < qkv.Length; i++) qkv[i] = Next();
        var (keys, values) = PastRows(kvHeads, capacity, hd, past, Next);
        var (cos, sin) = RopeTables(capacity, hd);
        float scale = 1f / MathF.Sqrt(hd);
        var (expected, expectedKeys, expectedValues, maxScore) = Reference(shape, qkv, tokens, keys, values, capacity, past, cos, sin, scale);

        var output = new float[tokens * heads * hd];
        Array.Fill(output, float.NaN); // every output must be written, not accumulated onto what was there
        using var pool = new KernelThreadPool(2);
        fixed (float* k = keys, v = values)
            CausalAttention.Run(shape, qkv, tokens, KvCacheType.Float32, k, v, capacity, past, cos, sin, scale, output, pool);

        if (magnitude > 1) Assert.IsGreaterThan(100.0, maxScore, "scores reach where e^x overflows float");
        // Values scale with the magnitude; the scores' float rounding with its square.
        Assert.IsLessThan(1e-5 * magnitude * magnitude * magnitude, TestData.MaxAbsDiff(output, expected), "attention");
        Assert.IsLessThan(1e-6 * magnitude, TestData.MaxAbsDiff(keys, expectedKeys), "keys: the new rows rotated in place, the others untouched");
        CollectionAssert.AreEqual(expectedValues, values, "values: the new rows copied in place, the others untouched");
    }

    [TestMethod]
    [DataRow(8, 2, 64, true, 37, 1, DisplayName = "bf16: decode step after 37 positions")]
    [DataRow(6, 3, 12, false, 101, 3, DisplayName = "bf16: head width 12, not a multiple of 2·W: each chunk widened for the fp32 loops")]
    [DataRow(4, 2, 16, false, 0, 70, DisplayName = "bf16: prompt of 70, the blocked products over widened keys and values")]
    [DataRow(8, 2, 64, false, 150, 1, DisplayName = "bf16: decode after 150, keys and values read in place a chunk at a time")]
    [DataRow(6, 2, 48, true, 200, 1, DisplayName = "bf16: head width 48 after 200")]
    [DataRow(8, 2, 64, true, 300, 3, DisplayName = "bf16: verification pass of 3 after 300")]
    [DataRow(4, 2, 8, false, 90, 1, DisplayName = "bf16: head width 8, a multiple of W but not of 2·W at W = 8")]
    [DataRow(4, 1, 24, true, 70, 2, DisplayName = "bf16: head width 24 (in place at W = 4, widened at 8 and 16)")]
    [DataRow(4, 2, 40, false, 130, 1, DisplayName = "bf16: head width 40")]
    [DataRow(4, 2, 80, true, 260, 1, DisplayName = "bf16: head width 80, in place with a tail of 2·W at W = 8")]
    [DataRow(4, 2, 128, false, 100, 70, DisplayName = "bf16: prompt of 70 after 100, head width 128: every tile's values widened once")]
    public void ABFloat16CacheMatchesAFloat64ReferenceOverItsRoundedRows(int heads, int kvHeads, int hd, bool interleaved, int past, int tokens)
    {
        var shape = new CausalAttention.Shape(heads, kvHeads, hd, interleaved);
        int capacity = past + tokens + 3, half = hd / 2;
        var rng = new Random(heads * 1000 + past + 7);
        float Next() => (float)(rng.NextDouble() * 2 - 1);
        var qkv = new float[tokens * shape.PackedWidth];
        for (int i = 0; i < qkv.Length; i++) qkv[i] = Next();
        var (pastKeys, pastValues) = PastRows(kvHeads, capacity, hd, past, Next);
        ushort[] keys = [.. pastKeys.Select(TensorEncoding.ToBFloat16)], values = [.. pastValues.Select(TensorEncoding.ToBFloat16)];
        var (cos, sin) = RopeTables(capacity, hd);
        float scale = 1f / MathF.Sqrt(hd);

        // What the cache must hold afterwards, written plainly: the new keys rotated in fp32 (as the RoPE step computes
        // them), then each new key and value rounded to bf16 (nearest even); the past rows untouched.
        var expectedKeys = (ushort[])keys.Clone();
        var expectedValues = (ushort[])values.Clone();
        int qDim = heads * hd, kvDim = kvHeads * hd;
        for (int t = 0; t < tokens; t++)
            for (int g = 0; g < kvHeads; g++)
            {
                int pos = past + t, row = t * shape.PackedWidth + qDim + g * hd, at = (g * capacity + pos) * hd;
                for (int j = 0; j < half; j++)
                {
                    int i0 = interleaved ? 2 * j : j, i1 = interleaved ? 2 * j + 1 : j + half;
                    float a = qkv[row + i0], b = qkv[row + i1], c = cos[pos * half + j], s = sin[pos * half + j];
                    expectedKeys[at + i0] = TensorEncoding.ToBFloat16(a * c - b * s);
                    expectedKeys[at + i1] = TensorEncoding.ToBFloat16(a * s + b * c);
                }
                for (int i = 0; i < hd; i++) expectedValues[at + i] = TensorEncoding.ToBFloat16(qkv[t * shape.PackedWidth + qDim + kvDim + g * hd + i]);
            }
        // The float64 attention over those rows: its own RoPE of q, and the cache's keys and values as they are.
        float[] Widen(ushort[] bits) => [.. bits.Select(x => BitConverter.UInt32BitsToSingle((uint)x << 16))];
        var expected = Attention(shape, qkv, tokens, Widen(expectedKeys), Widen(expectedValues), capacity, past, cos, sin, scale);

        var output = new float[tokens * qDim];
        Array.Fill(output, float.NaN);
        using var pool = new KernelThreadPool(2);
        fixed (ushort* k = keys, v = values)
            CausalAttention.Run(shape, qkv, tokens, KvCacheType.BFloat16, k, v, capacity, past, cos, sin, scale, output, pool);

        CollectionAssert.AreEqual(expectedKeys, keys, "keys: the new rows rotated and rounded to bf16 in place, the others untouched");
        CollectionAssert.AreEqual(expectedValues, values, "values: the new rows rounded to bf16 in place, the others untouched");
        Assert.IsLessThan(1e-5, TestData.MaxAbsDiff(output, expected), "attention over the bf16 rows");
    }

    [TestMethod]
    [DataRow(8, 1, 64, false, 700, 1, 4, DisplayName = "multi-query decode after 700 on 4 threads: 2 splits")]
    [DataRow(8, 1, 64, true, 1000, 3, 8, DisplayName = "multi-query verification of 3 after 1000 on 8 threads: 3 splits each, uneven bounds")]
    [DataRow(6, 2, 48, false, 900, 1, 8, DisplayName = "2 KV heads, head width 48, after 900 on 8 threads: 3 splits")]
    [DataRow(4, 2, 12, true, 600, 1, 5, DisplayName = "head width 12 after 600 on 5 threads: 2 splits of the widened path")]
    public void PositionsSplitAcrossThreadsGiveTheUnsplitAttention(int heads, int kvHeads, int hd, bool interleaved, int past, int tokens, int threads)
    {
        var shape = new CausalAttention.Shape(heads, kvHeads, hd, interleaved);
        int splits = CausalAttention.Splits(kvHeads, past + 1, threads);
        Assert.IsGreaterThan(1, splits, "the case must split");
        int capacity = past + tokens + 3;
        var rng = new Random(heads * 31 + past);
        float Next() => (float)(rng.NextDouble() * 2 - 1);
        var qkv = new float[tokens * shape.PackedWidth];
        for (int i = 0; i < qkv.Length; i++) qkv[i] = Next();
        var (keys, values) = PastRows(kvHeads, capacity, hd, past, Next);
        var (cos, sin) = RopeTables(capacity, hd);
        float scale = 1f / MathF.Sqrt(hd);
        var expected = Reference(shape, qkv, tokens, keys, values, capacity, past, cos, sin, scale).Output;

        float[] Run(KvCacheType type, int poolThreads)
        {
            var output = new float[tokens * heads * hd];
            Array.Fill(output, float.NaN);
            using var pool = new KernelThreadPool(poolThreads);
            if (type == KvCacheType.Float32)
            {
                var (k, v) = ((float[])keys.Clone(), (float[])values.Clone());
                fixed (float* kp = k, vp = v) CausalAttention.Run(shape, qkv, tokens, type, kp, vp, capacity, past, cos, sin, scale, output, pool);
            }
            else
            {
                ushort[] k = [.. keys.Select(TensorEncoding.ToBFloat16)], v = [.. values.Select(TensorEncoding.ToBFloat16)];
                fixed (ushort* kp = k, vp = v) CausalAttention.Run(shape, qkv, tokens, type, kp, vp, capacity, past, cos, sin, scale, output, pool);
            }
            return output;
        }
        // fp32: split against the float64 reference; bf16: split against the same cache unsplit (one thread), which the
        // bf16 test above holds to the reference.
        Assert.IsLessThan(1e-5, TestData.MaxAbsDiff(Run(KvCacheType.Float32, threads), expected), $"fp32 cache, {splits} splits");
        Assert.IsLessThan(1e-6, TestData.MaxAbsDiff(Run(KvCacheType.BFloat16, threads), Run(KvCacheType.BFloat16, 1)), $"bf16 cache, {splits} splits");
    }

    /// <summary>
    /// A call of several tokens below <see cref="CausalAttention.BlockedTokens"/> (a verification pass) gives each token
    /// bit for bit what one-token calls (decode steps) give: speculative greedy output equals target-only greedy output
    /// only if it does. With 4 threads and one KV head the tokens' positions are split, each token as its own decode step
    /// would be; with 1 thread nothing splits.
    /// </summary>
    [TestMethod]
    [DataRow(KvCacheType.Float32, 4)]
    [DataRow(KvCacheType.BFloat16, 4)]
    [DataRow(KvCacheType.Float32, 1)]
    [DataRow(KvCacheType.BFloat16, 1)]
    [DataRow(KvCacheType.Float32, 4, 460)]
    [DataRow(KvCacheType.BFloat16, 4, 460)]
    [DataRow(KvCacheType.Float32, 3, 1000)]
    [DataRow(KvCacheType.BFloat16, 8, 1500)]
    public void AVerificationPassGivesEachTokenExactlyWhatItsDecodeStepGives(KvCacheType type, int threads, int past = 740)
    {
        // After 460 the call's first tokens take one part and its last two (from 512 positions); after 740 and 1500 the
        // count grows within the call too: every token must be split as its own decode step is.
        var shape = new CausalAttention.Shape(8, 1, 64, false);
        int tokens = CausalAttention.BlockedTokens - 1, capacity = past + tokens;
        Assert.IsGreaterThan(GenerationOptions.MaxDraftTokens, CausalAttention.BlockedTokens - 1, "a verification pass of the most drafts stays per token");
        if (threads > 1) Assert.IsGreaterThan(1, CausalAttention.Splits(shape.KvHeads, past + tokens, threads), "the case must split");
        var rng = new Random(5);
        float Next() => (float)(rng.NextDouble() * 2 - 1);
        var qkv = new float[tokens * shape.PackedWidth];
        for (int i = 0; i < qkv.Length; i++) qkv[i] = Next();
        var (keys, values) = PastRows(shape.KvHeads, capacity, shape.HeadDim, past, Next);
        var (cos, sin) = RopeTables(capacity, shape.HeadDim);
        using var pool = new KernelThreadPool(threads);
        float[] Attend(bool oneAtATime)
        {
            int width = shape.Heads * shape.HeadDim;
            var output = new float[tokens * width];
            var (k, v) = ((float[])keys.Clone(), (float[])values.Clone());
            ushort[] kb = [.. k.Select(TensorEncoding.ToBFloat16)], vb = [.. v.Select(TensorEncoding.ToBFloat16)];
            fixed (float* kp = k, vp = v)
            fixed (ushort* kbp = kb, vbp = vb)
            {
                void* ks = type == KvCacheType.Float32 ? (void*)kp : kbp, vs = type == KvCacheType.Float32 ? (void*)vp : vbp;
                if (!oneAtATime) CausalAttention.Run(shape, qkv, tokens, type, ks, vs, capacity, past, cos, sin, 0.125f, output, pool);
                else
                    for (int t = 0; t < tokens; t++)
                        CausalAttention.Run(shape, qkv.AsSpan(t * shape.PackedWidth, shape.PackedWidth), 1, type, ks, vs, capacity, past + t, cos, sin, 0.125f, output.AsSpan(t * width, width), pool);
            }
            return output;
        }
        CollectionAssert.AreEqual(Attend(oneAtATime: true), Attend(oneAtATime: false));
    }

    [TestMethod]
    public void SplitsGiveEveryThreadWorkOnlyWhenThePairsCannotAndNeverGoBelowTheMinimumSpan()
    {
        for (int threads = 1; threads <= 64; threads++)
            for (int pairs = 1; pairs <= 40; pairs++)
                foreach (int positions in new[] { 1, 255, 256, 511, 512, 1000, 2000, 4096, 32768 })
                {
                    int splits = CausalAttention.Splits(pairs, positions, threads);
                    string at = $"{pairs} pairs, {positions} positions, {threads} threads: {splits} splits";
                    Assert.IsGreaterThanOrEqualTo(1, splits, at);
                    if (pairs >= threads) Assert.AreEqual(1, splits, at);
                    if (splits > 1) Assert.IsGreaterThanOrEqualTo(CausalAttention.MinSplitPositions, positions / splits, at);
                    // As many items as threads wherever the positions allow it, and no more splits than that takes.
                    if (positions / CausalAttention.MinSplitPositions >= threads) Assert.IsGreaterThanOrEqualTo(threads, pairs * splits, at);
                    Assert.IsLessThanOrEqualTo((threads + pairs - 1) / pairs, splits, at);
                }
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
            Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => CausalAttention.Run(shape, new float[2 * shape.PackedWidth], 2, KvCacheType.Float32, kp, vp, 8, 7, table, table, 0.5f, new float[2 * 8], pool));
        }
    }

    /// <summary>RoPE angles as the engine's tables hold them: [positions, hd/2] cos and sin.</summary>
    private static (float[] Cos, float[] Sin) RopeTables(int capacity, int hd)
    {
        int half = hd / 2;
        var cos = new float[capacity * half];
        var sin = new float[capacity * half];
        for (int p = 0; p < capacity; p++)
            for (int j = 0; j < half; j++)
            {
                double angle = p * Math.Pow(10000, -2.0 * j / hd);
                cos[p * half + j] = (float)Math.Cos(angle);
                sin[p * half + j] = (float)Math.Sin(angle);
            }
        return (cos, sin);
    }

    /// <summary>A cache [kvHeads, capacity, hd] whose first <paramref name="past"/> rows per head are drawn from <paramref name="next"/>, the rest zero.</summary>
    private static (float[] Keys, float[] Values) PastRows(int kvHeads, int capacity, int hd, int past, Func<float> next)
    {
        var keys = new float[kvHeads * capacity * hd];
        var values = new float[keys.Length];
        for (int g = 0; g < kvHeads; g++)
            for (int p = 0; p < past; p++)
                for (int i = 0; i < hd; i++) { keys[(g * capacity + p) * hd + i] = next(); values[(g * capacity + p) * hd + i] = next(); }
        return (keys, values);
    }

    /// <summary>Float64 causal attention of the new tokens' q (rotated here) over caches already holding every row up to the last token.</summary>
    private static float[] Attention(CausalAttention.Shape shape, float[] qkv, int tokens, float[] keys, float[] values, int capacity, int past, float[] cos, float[] sin, float scale)
    {
        int hd = shape.HeadDim, half = hd / 2, qDim = shape.Heads * hd, group = shape.Heads / shape.KvHeads;
        var output = new float[tokens * qDim];
        for (int t = 0; t < tokens; t++)
            for (int h = 0; h < shape.Heads; h++)
            {
                int pos = past + t, g = h / group, length = pos + 1;
                var q = new double[hd];
                for (int j = 0; j < half; j++)
                {
                    int i0 = shape.Interleaved ? 2 * j : j, i1 = shape.Interleaved ? 2 * j + 1 : j + half;
                    double a = qkv[t * shape.PackedWidth + h * hd + i0], b = qkv[t * shape.PackedWidth + h * hd + i1], c = cos[pos * half + j], s = sin[pos * half + j];
                    q[i0] = a * c - b * s;
                    q[i1] = a * s + b * c;
                }
                var scores = new double[length];
                for (int p = 0; p < length; p++)
                {
                    double dot = 0;
                    for (int i = 0; i < hd; i++) dot += q[i] * keys[(g * capacity + p) * hd + i];
                    scores[p] = dot * scale;
                }
                double max = scores.Max(), sum = 0;
                for (int p = 0; p < length; p++) sum += scores[p] = Math.Exp(scores[p] - max);
                for (int i = 0; i < hd; i++)
                {
                    double o = 0;
                    for (int p = 0; p < length; p++) o += scores[p] / sum * values[(g * capacity + p) * hd + i];
                    output[t * qDim + h * hd + i] = (float)o;
                }
            }
        return output;
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
