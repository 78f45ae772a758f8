using AnyPrecML.Quantization;

namespace AnyPrecML.Tests;

[TestClass]
public sealed class QuantizerTests
{
    private static (float[] Values, float[] Weights) RandomRow(int n, int seed, bool zeroSomeWeights = false)
    {
        var rng = new Random(seed);
        var v = new float[n];
        var w = new float[n];
        for (int i = 0; i < n; i++)
        {
            v[i] = (float)(TestData.Gaussian(rng) * 0.02 * (rng.NextDouble() < 0.05 ? 6 : 1)); // heavy-ish tails like real weights
            w[i] = zeroSomeWeights && rng.NextDouble() < 0.2 ? 0f : (float)(rng.NextDouble() * rng.NextDouble() * 10);
        }
        return (v, w);
    }

    public static IEnumerable<object[]> Rows =>
    [
        [257, 1, 3, 8, false],
        [100, 2, 2, 6, false],
        [64, 3, 4, 8, true],
        [1000, 4, 3, 7, false],
    ];

    [TestMethod]
    [DynamicData(nameof(Rows))]
    public void EveryWidthIsTheTopBitsOfTheParentAndEveryCentroidIsItsClustersWeightedMean(int n, int seed, int seedBits, int parentBits, bool zeros)
    {
        var (v, w) = RandomRow(n, seed, zeros);
        var q = RowQuantizer.Quantize(v, w, seedBits, parentBits, 42);
        var matrix = BitplaneMatrix.FromRows("row", [q], n);
        var codes = new byte[n];
        for (int b = seedBits; b <= parentBits; b++)
        {
            matrix.RowCodes(0, b, codes);
            for (int j = 0; j < n; j++) Assert.AreEqual(q.Codes[j] >> (parentBits - b), codes[j], $"b={b} element {j}");

            // Independent check in float64: each centroid is the weighted mean of the elements coded to it.
            var table = q.Table(b);
            for (int c = 0; c < 1 << b; c++)
            {
                double sw = 0, swx = 0, sx = 0; int count = 0;
                for (int j = 0; j < n; j++)
                    if (codes[j] == c) { sw += w[j]; swx += (double)w[j] * v[j]; sx += v[j]; count++; }
                Assert.IsFalse(float.IsNaN(table[c]), $"b={b} centroid {c} is NaN");
                if (count == 0) continue;
                double mean = sw > 0 ? swx / sw : sx / count;
                Assert.AreEqual(mean, table[c], 1e-6 + 1e-5 * Math.Abs(mean), $"b={b} centroid {c}");
            }
        }
    }

    [TestMethod]
    public void KMeansNeverIncreasesItsObjective()
    {
        foreach (var (v, w) in new[] { RandomRow(5000, 9), RandomRow(3000, 10, zeroSomeWeights: true), (RealRow(), Enumerable.Repeat(1f, 14336).ToArray()) })
        {
            var q = new RowQuantizer(v, w);
            foreach (int k in new[] { 4, 8, 16 })
            {
                var history = new List<double>();
                q.SeedKMeans(k, 7, history.Add);
                Assert.IsNotEmpty(history);
                for (int i = 1; i < history.Count; i++)
                    Assert.IsLessThanOrEqualTo(history[i - 1] * (1 + 1e-12) + 1e-18, history[i], $"k={k} iteration {i}: {history[i - 1]} → {history[i]}");
            }
        }
    }

    [TestMethod]
    public void EachSplitIsTheBestCutOfItsCluster()
    {
        // Brute force: every contiguous cut of a cluster's sorted members; the upscaled children must reach the minimum.
        var (v, w) = RandomRow(150, 5);
        var q = RowQuantizer.Quantize(v, w, 2, 5, 1);
        for (int b = 3; b <= 5; b++)
        {
            for (int parent = 0; parent < 1 << (b - 1); parent++)
            {
                var members = Enumerable.Range(0, v.Length).Where(j => q.Codes[j] >> (5 - b + 1) == parent).OrderBy(j => v[j]).ToArray();
                double best = double.PositiveInfinity;
                for (int s = 0; s <= members.Length; s++)
                {
                    if (s > 0 && s < members.Length && v[members[s - 1]] == v[members[s]]) continue;
                    best = Math.Min(best, Sse(members[..s], v, w) + Sse(members[s..], v, w));
                }
                var left = members.Where(j => (q.Codes[j] >> (5 - b)) == 2 * parent).ToArray();
                var right = members.Where(j => (q.Codes[j] >> (5 - b)) == 2 * parent + 1).ToArray();
                Assert.AreEqual(best, Sse(left, v, w) + Sse(right, v, w), 1e-12 + 1e-9 * best, $"b={b} cluster {parent}");
            }
        }

        static double Sse(int[] idx, float[] v, float[] w)
        {
            double sw = idx.Sum(j => (double)w[j]);
            if (idx.Length < 2 || sw == 0) return 0;
            double mean = idx.Sum(j => (double)w[j] * v[j]) / sw;
            return idx.Sum(j => w[j] * (v[j] - mean) * (v[j] - mean));
        }
    }

    [TestMethod]
    public void FewDistinctValuesGiveExactCodesAndNoNaN()
    {
        float[] v = [0.5f, -1f, 0.5f, 2f, -1f, 2f, 2f, 0.5f, -1f, 0.5f];
        var q = RowQuantizer.Quantize(v, Enumerable.Repeat(1f, v.Length).ToArray(), 3, 8, 0);
        for (int b = 3; b <= 8; b++)
        {
            Assert.IsFalse(q.Table(b).Any(float.IsNaN));
            for (int j = 0; j < v.Length; j++) Assert.AreEqual(v[j], q.Table(b)[q.Codes[j] >> (8 - b)], $"b={b} element {j}");
        }
        var constant = RowQuantizer.Quantize(new float[40], new float[40], 3, 8, 0); // all zero, all weights zero
        Assert.IsTrue(constant.Centroids.All(t => t.All(c => c == 0)));
    }

    [TestMethod]
    public void RejectsNonFiniteInput()
    {
        Assert.ThrowsExactly<ArgumentException>(() => RowQuantizer.Quantize([1f, float.NaN], [1f, 1f], 1, 2, 0));
        Assert.ThrowsExactly<ArgumentException>(() => RowQuantizer.Quantize([1f, 2f], [1f, -1f], 1, 2, 0));
        Assert.ThrowsExactly<ArgumentException>(() => RowQuantizer.Quantize([], [], 1, 2, 0));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => new QuantizerOptions { SeedBits = 3, ParentBits = 9 }.Validated());
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => new QuantizerOptions { SeedBits = 4, ParentBits = 3 }.Validated());
    }

    [TestMethod]
    public void UpscaledObjectiveOnARealLlama3RowFallsWithEveryBitAndStaysNearIndependentKMeans()
    {
        var v = RealRow();
        var w = Enumerable.Repeat(1f, v.Length).ToArray();
        var q = RowQuantizer.Quantize(v, w, 3, 8, 0);
        double previous = double.PositiveInfinity;
        for (int b = 3; b <= 8; b++)
        {
            double upscaled = Mse(v, q.Table(b), q.Codes.Select(c => c >> (8 - b)).ToArray());
            var (codes, centroids) = RowQuantizer.KMeans(v, w, 1 << b, 0);
            double independent = Mse(v, centroids, codes.Select(c => (int)c).ToArray());
            Assert.IsLessThan(previous, upscaled, $"b={b}");
            Assert.IsLessThan(independent * 1.25, upscaled, $"b={b}: upscaled {upscaled:E3} vs independent {independent:E3}");
            previous = upscaled;
        }

        static double Mse(float[] v, float[] table, int[] codes) => v.Select((x, j) => (x - (double)table[codes[j]]) * (x - table[codes[j]])).Average();
    }

    internal static float[] RealRow()
    {
        var bytes = File.ReadAllBytes(TestData.Shared("data", "llama3-8b-row", "mlp_down_proj_layer8_row214.f32"));
        Assert.AreEqual(14336 * 4, bytes.Length);
        return System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(bytes).ToArray();
    }
}
