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
    public void UpscaledObjectiveOnARealLlama3RowFallsWithEveryBitAndStaysNearTheExactIndependentOptimum()
    {
        var v = RealRow();
        var w = Enumerable.Repeat(1f, v.Length).ToArray();
        var q = RowQuantizer.Quantize(v, w, 3, 8, 0);
        double previous = double.PositiveInfinity;
        for (int b = 3; b <= 8; b++)
        {
            double upscaled = Mse(v, q.Table(b), q.Codes.Select(c => c >> (8 - b)).ToArray());
            var (codes, centroids) = RowQuantizer.Cluster(v, w, 1 << b, SeedMethod.Exact, 0);
            double independent = Mse(v, centroids, codes.Select(c => (int)c).ToArray());
            Assert.IsLessThan(previous, upscaled, $"b={b}");
            // The independent model is the exact optimum at 2^b clusters: nested codes cannot beat it, and stay within 30% of it.
            Assert.IsLessThanOrEqualTo(upscaled * (1 + 1e-6), independent, $"b={b}: upscaled {upscaled:E3} vs independent {independent:E3}");
            Assert.IsLessThan(independent * 1.3, upscaled, $"b={b}: upscaled {upscaled:E3} vs independent {independent:E3}");
            previous = upscaled;
        }

        static double Mse(float[] v, float[] table, int[] codes) => v.Select((x, j) => (x - (double)table[codes[j]]) * (x - table[codes[j]])).Average();
    }

    /// <summary>Σ w (x − mean)² per code group, the weighted mean recomputed in float64 from the codes alone.</summary>
    internal static double Objective(float[] v, float[] w, byte[] codes)
    {
        var sw = new Dictionary<int, (double W, double Wx, double Sx, int N)>();
        for (int j = 0; j < v.Length; j++)
        {
            sw.TryGetValue(codes[j], out var g);
            sw[codes[j]] = (g.W + w[j], g.Wx + (double)w[j] * v[j], g.Sx + v[j], g.N + 1);
        }
        double total = 0;
        for (int j = 0; j < v.Length; j++)
        {
            var g = sw[codes[j]];
            double mean = g.W > 0 ? g.Wx / g.W : g.Sx / g.N;
            total += w[j] * (v[j] - mean) * (v[j] - mean);
        }
        return total;
    }

    /// <summary>Elements with equal values share a code.</summary>
    private static void AssertEqualValuesShareCodes(float[] v, byte[] codes, string what)
    {
        var codeOf = new Dictionary<float, byte>();
        for (int j = 0; j < v.Length; j++)
            if (codeOf.TryGetValue(v[j], out byte c)) Assert.AreEqual(c, codes[j], $"{what}: value {v[j]} split across codes");
            else codeOf[v[j]] = codes[j];
    }

    [TestMethod]
    public void ExactSeedEqualsBruteForceOverAllContiguousPartitions()
    {
        // Small rows with many repeated values and some zero weights; brute force cuts the sorted distinct
        // values into k contiguous groups in every possible way (the optimum of 1-D k-means is contiguous).
        var rng = new Random(17);
        for (int trial = 0; trial < 300; trial++)
        {
            int n = rng.Next(1, 15), k = rng.Next(1, 6);
            var v = new float[n];
            var w = new float[n];
            for (int i = 0; i < n; i++)
            {
                v[i] = rng.Next(-6, 7) * 0.25f + (rng.NextDouble() < 0.5 ? (float)rng.NextDouble() : 0);
                w[i] = rng.NextDouble() < 0.15 ? 0f : (float)(rng.NextDouble() * 4);
            }
            var distinct = v.Distinct().Order().ToArray();
            double brute = double.PositiveInfinity;
            foreach (var cuts in Cuts(distinct.Length, Math.Min(k, distinct.Length)))
            {
                var codes = v.Select(x => (byte)cuts.Count(c => c <= Array.IndexOf(distinct, x))).ToArray();
                brute = Math.Min(brute, Objective(v, w, codes));
            }
            var (exact, centroids) = RowQuantizer.Cluster(v, w, k, SeedMethod.Exact, 0);
            double dp = Objective(v, w, exact);
            Assert.AreEqual(brute, dp, 1e-12 + 1e-9 * brute, $"trial {trial}: n={n} k={k} values [{string.Join(", ", v)}] weights [{string.Join(", ", w)}]");
            AssertEqualValuesShareCodes(v, exact, $"trial {trial}");
            Assert.AreEqual(k, centroids.Length);
            Assert.IsFalse(centroids.Any(float.IsNaN));
        }

        // Every choice of parts - 1 cut positions among 1..m-1 (a cut at c starts a group at distinct index c).
        static IEnumerable<int[]> Cuts(int m, int parts)
        {
            if (parts == 1) { yield return []; yield break; }
            foreach (var rest in Cuts(m, parts - 1))
                for (int c = (rest.Length == 0 ? 0 : rest[^1]) + 1; c < m; c++) yield return [.. rest, c];
        }
    }

    [TestMethod]
    public void ClusteringEveryDistinctValueAloneOrdersTheCodesAsTheValues()
    {
        // With at least as many clusters as distinct values each value is its own cluster, so the codes
        // are the ranks of the values: a check of the row sort on float32 rows (all key bits vary), bf16
        // rows (two 8-bit passes), signed zeros, subnormals, extremes and a row of one repeated value.
        var rng = new Random(41);
        List<float[]> rows =
        [
            [0f, -0f, 1e-45f, -1e-45f, float.MaxValue, -float.MaxValue, 1f, -1f, 0.5f, -0.5f, 0f, -2.5e-38f],
            [3.25f, 3.25f, 3.25f],
        ];
        for (int r = 0; r < 6; r++)
        {
            var v = new float[rng.Next(2, 240)];
            for (int i = 0; i < v.Length; i++) v[i] = (float)(TestData.Gaussian(rng) * Math.Pow(10, rng.Next(-6, 3)));
            if (r % 2 == 1) for (int i = 0; i < v.Length; i++) v[i] = BitConverter.UInt32BitsToSingle(BitConverter.SingleToUInt32Bits(v[i]) & 0xFFFF0000u);
            rows.Add(v);
        }
        foreach (var v in rows)
        {
            var (codes, _) = RowQuantizer.Cluster(v, Enumerable.Repeat(1f, v.Length).ToArray(), 256, SeedMethod.Exact, 0);
            var ranks = v.Distinct().Order().ToList(); // -0 and +0 are one value
            for (int j = 0; j < v.Length; j++) Assert.AreEqual(ranks.IndexOf(v[j]), codes[j], $"value {v[j]} in a row of {v.Length}");
        }
    }

    [TestMethod]
    public void ExactSeedEqualsAPlainQuadraticDynamicProgramOnWiderRows()
    {
        // Rows too wide for brute force but wide enough for every level of the divide-and-conquer recursion:
        // the reference is the textbook O(k·m²) DP with no monotone-split shortcut, its run costs accumulated
        // from each run's start (not the quantizer's prefix sums). Values continuous, on a coarse grid (many
        // ties) and bf16-rounded; weights unit, equal, uniform, χ²-like and partly zero; n below, at and above k.
        var rng = new Random(29);
        for (int trial = 0; trial < 120; trial++)
        {
            int n = trial % 10 == 0 ? rng.Next(1, 12) : rng.Next(12, 400);
            int k = new[] { 1, 2, 3, 5, 8, 8, 16, 32, 64, 128 }[rng.Next(10)];
            int valueKind = trial % 3, weightKind = (trial / 3) % 5;
            var v = new float[n];
            var w = new float[n];
            for (int i = 0; i < n; i++)
            {
                double g = TestData.Gaussian(rng) * 0.02;
                v[i] = valueKind switch
                {
                    0 => (float)g,
                    1 => (float)(Math.Round(g / 0.004) * 0.004),
                    _ => BitConverter.UInt32BitsToSingle(BitConverter.SingleToUInt32Bits((float)g) & 0xFFFF0000u),
                };
                double u = TestData.Gaussian(rng);
                w[i] = weightKind switch { 0 => 1f, 1 => 0.37f, 2 => (float)rng.NextDouble(), 3 => (float)(u * u), _ => rng.NextDouble() < 0.3 ? 0f : (float)(u * u) };
            }
            double reference = QuadraticDp(v, w, k);
            var (exact, centroids) = RowQuantizer.Cluster(v, w, k, SeedMethod.Exact, 0);
            double dp = Objective(v, w, exact);
            Assert.AreEqual(reference, dp, 1e-15 + 1e-9 * reference, $"trial {trial}: n={n} k={k} values kind {valueKind} weights kind {weightKind}");
            AssertEqualValuesShareCodes(v, exact, $"trial {trial}");
            Assert.AreEqual(k, centroids.Length);
        }

        // min over contiguous partitions of the sorted distinct values into at most k runs of Σ w (x − weighted mean)².
        static double QuadraticDp(float[] v, float[] w, int k)
        {
            var groups = v.Select((x, i) => (X: (double)x, W: (double)w[i])).GroupBy(p => p.X).OrderBy(g => g.Key)
                .Select(g => (X: g.Key, W: g.Sum(p => p.W))).ToArray();
            int m = groups.Length;
            var cost = new double[m + 1, m + 1];
            for (int a = 0; a < m; a++)
            {
                double sw = 0, sd = 0, sdd = 0, c = groups[a].X;
                for (int b = a + 1; b <= m; b++)
                {
                    double d = groups[b - 1].X - c, gw = groups[b - 1].W;
                    sw += gw; sd += gw * d; sdd += gw * d * d;
                    cost[a, b] = sw > 0 ? Math.Max(0, sdd - sd * sd / sw) : 0;
                }
            }
            var best = new double[m + 1];
            for (int i = 1; i <= m; i++) best[i] = cost[0, i];
            for (int j = 2; j <= Math.Min(k, m); j++)
            {
                var next = new double[m + 1];
                for (int i = 0; i <= m; i++)
                {
                    next[i] = best[i];
                    for (int t = j - 1; t < i; t++) next[i] = Math.Min(next[i], best[t] + cost[t, i]);
                }
                best = next;
            }
            return best[m];
        }
    }

    [TestMethod]
    public void ExactSeedIsNeverWorseThanKMeansOnEveryStories260KRowAndTheLlama3Row()
    {
        // Every block linear row of stories260K and the real Llama-3 row, unweighted, weighted by the
        // activation-Hessian diagonal (stories260K) and by χ²(1) per-weight draws (Fisher-like), at the
        // seed width and at every independent width 2^b, b = 3..8.
        using var source = AnyPrecML.Models.LlamaCheckpoint.Open(TestData.Stories260K);
        var tok = AnyPrecML.Tokenization.LlamaTokenizerLoader.Load(source, TestData.Tok512);
        var calibration = CalibrationSet.FromText(tok, string.Join('\n', File.ReadLines(TestData.TinyStories).Take(2)), 2, 128, 512, "first 2 stories");
        var hessian = HessianDiagonalSensitivity.Collect(AnyPrecML.Reference.ReferenceEngine.FromCheckpoint(source), calibration);
        var rows = new List<(float[] V, float[][] Weightings, string What)>();
        var rng = new Random(3);
        float[] Chi2(int n) => Enumerable.Range(0, n).Select(_ => { double g = TestData.Gaussian(rng); return (float)(g * g); }).ToArray();
        for (int l = 0; l < source.Config.Layers; l++)
            foreach (var part in AnyPrecML.Models.LlamaTensorNames.BlockLinears)
            {
                var shape = AnyPrecML.Models.LlamaTensorNames.ShapeOf(source.Config, part);
                int R = (int)shape[0], C = (int)shape[1];
                var wt = AnyPrecisionQuantizer.SourceWeight(source, l, part);
                var h = AnyPrecisionQuantizer.SensitivityInHfOrder(source.Config, part, hessian.For(l, part, R, C));
                for (int r = 0; r < R; r++)
                    rows.Add((wt[(r * C)..((r + 1) * C)], [Enumerable.Repeat(1f, C).ToArray(), h.Row(r).ToArray(), Chi2(C)], $"layer {l} {part} row {r}"));
            }
        var real = RealRow();
        rows.Add((real, [Enumerable.Repeat(1f, real.Length).ToArray(), Chi2(real.Length)], "Llama-3 row"));

        int checkedRows = 0;
        Parallel.ForEach(rows, row =>
        {
            foreach (var w in row.Weightings)
                for (int b = 3; b <= 8; b++)
                {
                    var (exact, _) = RowQuantizer.Cluster(row.V, w, 1 << b, SeedMethod.Exact, 0);
                    var (kmeans, _) = RowQuantizer.Cluster(row.V, w, 1 << b, SeedMethod.KMeans, 0);
                    double e = Objective(row.V, w, exact), k = Objective(row.V, w, kmeans);
                    Assert.IsLessThanOrEqualTo(k * (1 + 1e-9) + 1e-18, e, $"{row.What} b={b}: exact {e} vs k-means {k}");
                    AssertEqualValuesShareCodes(row.V, exact, $"{row.What} b={b}");
                }
            Interlocked.Increment(ref checkedRows);
        });
        Assert.AreEqual(rows.Count, checkedRows);
        Assert.IsGreaterThan(3000, rows.Count);
    }

    [TestMethod]
    public void UpscaledCodesNeverSplitEqualValues()
    {
        // The Llama-3 row is bf16 at heart: 14,336 weights but far fewer distinct values.
        var v = RealRow();
        Assert.IsLessThan(v.Length / 2, v.Distinct().Count());
        var q = RowQuantizer.Quantize(v, Enumerable.Repeat(1f, v.Length).ToArray(), 3, 8, 0);
        AssertEqualValuesShareCodes(v, q.Codes, "parent codes");
    }

    internal static float[] RealRow()
    {
        var bytes = File.ReadAllBytes(TestData.Shared("data", "llama3-8b-row", "mlp_down_proj_layer8_row214.f32"));
        Assert.AreEqual(14336 * 4, bytes.Length);
        return System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(bytes).ToArray();
    }
}
