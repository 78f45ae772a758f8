namespace AnyPrecML.Quantization;

/// <summary>The any-precision quantization of one weight row.</summary>
/// <param name="Codes">Parent codes (n bits) in the row's element order; the b-bit code is Codes[j] >> (n - b).</param>
/// <param name="Centroids">Centroid tables for b = seed..n (index b - seed), each of 2^b values in code order.</param>
/// <param name="SeedBits">Seed width.</param>
/// <param name="ParentBits">Parent width n.</param>
public sealed record RowQuantization(byte[] Codes, float[][] Centroids, int SeedBits, int ParentBits)
{
    /// <summary>The centroid table for b bits.</summary>
    public float[] Table(int bits) => Centroids[bits - SeedBits];
}

/// <summary>
/// Any-precision quantization of one row: a sensitivity-weighted 1-D k-means seed with 2^seed
/// centroids (SqueezeLLM), then incremental upscaling: every cluster splits in two by weighted
/// 2-means over its members, one bit at a time, children coded 2c and 2c+1 (Any-Precision LLM).
///
/// Everything works on the row sorted once by value: a 1-D cluster of the optimal solution is a
/// contiguous run of the sorted values, so with prefix sums of w, w·x and w·x² a Lloyd step costs
/// O(k log n) (binary search for the k-1 boundaries) and the best split of a cluster is an exact
/// scan over its possible cut points.
/// </summary>
public sealed class RowQuantizer
{
    /// <summary>Lloyd iterations at most (the loop stops earlier once no boundary moves).</summary>
    public const int MaxIterations = 100;

    private readonly int _n;
    private readonly float[] _x;        // sorted values
    private readonly int[] _order;      // _order[i] = original index of the i-th smallest value
    private readonly double[] _w, _wx, _wxx, _sx, _sxx; // prefix sums (weighted, and unweighted for zero-weight runs)

    /// <summary>Sorts <paramref name="values"/> with their <paramref name="weights"/> (sensitivities, ≥ 0) and builds prefix sums.</summary>
    public RowQuantizer(ReadOnlySpan<float> values, ReadOnlySpan<float> weights)
    {
        if (values.Length != weights.Length) throw new ArgumentException($"{values.Length} values but {weights.Length} weights.");
        if (values.Length == 0) throw new ArgumentException("the row is empty.", nameof(values));
        _n = values.Length;
        (_x, _order) = SortWithIndex(values);
        _w = new double[_n + 1]; _wx = new double[_n + 1]; _wxx = new double[_n + 1]; _sx = new double[_n + 1]; _sxx = new double[_n + 1];
        for (int i = 0; i < _n; i++)
        {
            double w = weights[_order[i]];
            if (!(w >= 0) || double.IsInfinity(w)) throw new ArgumentException($"sensitivity {w} at element {_order[i]} must be finite and ≥ 0.", nameof(weights));
            double x = _x[i];
            _w[i + 1] = _w[i] + w; _wx[i + 1] = _wx[i] + w * x; _wxx[i + 1] = _wxx[i] + w * x * x;
            _sx[i + 1] = _sx[i] + x; _sxx[i + 1] = _sxx[i] + x * x;
        }
    }

    /// <summary>Quantizes the row: seed k-means, then upscaling to <paramref name="parentBits"/>.</summary>
    public static RowQuantization Quantize(ReadOnlySpan<float> values, ReadOnlySpan<float> weights, int seedBits, int parentBits, ulong seed)
    {
        var q = new RowQuantizer(values, weights);
        var (clusters, seedCentroids) = q.SeedKMeans(1 << seedBits, seed);
        var centroids = new float[parentBits - seedBits + 1][];
        centroids[0] = Array.ConvertAll(seedCentroids, v => (float)v);
        for (int b = seedBits + 1; b <= parentBits; b++)
        {
            clusters = q.Split(clusters);
            var parents = centroids[b - seedBits - 1];
            // An empty child (a cluster of one distinct value) keeps its parent's centroid.
            centroids[b - seedBits] = Array.ConvertAll(q.Means(clusters, i => parents[i >> 1]), v => (float)v);
        }
        return new RowQuantization(q.CodesOf(clusters), centroids, seedBits, parentBits);
    }

    /// <summary>Weighted k-means with <paramref name="k"/> clusters alone (the "independent" baseline at log2(k) bits).</summary>
    public static (byte[] Codes, float[] Centroids) KMeans(ReadOnlySpan<float> values, ReadOnlySpan<float> weights, int k, ulong seed)
    {
        var q = new RowQuantizer(values, weights);
        var (clusters, centroids) = q.SeedKMeans(k, seed);
        return (q.CodesOf(clusters), Array.ConvertAll(centroids, v => (float)v));
    }

    /// <summary>
    /// Weighted Lloyd's k-means from a deterministic weighted k-means++ start. Returns the cluster
    /// boundaries in sorted order (cluster c is [bounds[c], bounds[c+1])) and the centroids, each the
    /// mean of its cluster (an empty cluster keeps its last centroid). <paramref name="onIteration"/>
    /// receives the weighted objective after each update step.
    /// </summary>
    public (int[] Bounds, double[] Centroids) SeedKMeans(int k, ulong seed, Action<double>? onIteration = null)
    {
        var c = KMeansPlusPlus(k, seed);
        var bounds = Assign(c);
        for (int it = 0; it < MaxIterations; it++)
        {
            c = Means(bounds, i => c[i]);
            onIteration?.Invoke(Objective(bounds, c));
            var next = Assign(c);
            if (next.AsSpan().SequenceEqual(bounds)) return (bounds, c);
            bounds = next;
        }
        return (bounds, Means(bounds, i => c[i]));
    }

    /// <summary>Boundaries of the nearest-centroid clusters for ascending centroids <paramref name="c"/>.</summary>
    private int[] Assign(double[] c)
    {
        int k = c.Length;
        var bounds = new int[k + 1];
        bounds[k] = _n;
        for (int i = 1; i < k; i++)
        {
            // Values ≤ the midpoint go to the lower centroid.
            double mid = 0.5 * (c[i - 1] + c[i]);
            int lo = bounds[i - 1], hi = _n;
            while (lo < hi) { int m = (lo + hi) >> 1; if (_x[m] <= mid) lo = m + 1; else hi = m; }
            bounds[i] = lo;
        }
        return bounds;
    }

    /// <summary>Mean of each cluster: weighted; unweighted where all its weights are zero; <paramref name="empty"/>(c) where it has no members.</summary>
    private double[] Means(int[] bounds, Func<int, double> empty)
    {
        int k = bounds.Length - 1;
        var c = new double[k];
        for (int i = 0; i < k; i++) c[i] = Mean(bounds[i], bounds[i + 1]) ?? empty(i);
        return c;
    }

    private double? Mean(int a, int b)
    {
        if (a == b) return null;
        double w = _w[b] - _w[a];
        return w > 0 ? (_wx[b] - _wx[a]) / w : (_sx[b] - _sx[a]) / (b - a);
    }

    /// <summary>Σ w (x - c)² over all clusters.</summary>
    public double Objective(int[] bounds, double[] c)
    {
        double total = 0;
        for (int i = 0; i + 1 < bounds.Length; i++)
        {
            int a = bounds[i], b = bounds[i + 1];
            total += (_wxx[b] - _wxx[a]) - 2 * c[i] * (_wx[b] - _wx[a]) + c[i] * c[i] * (_w[b] - _w[a]);
        }
        return total;
    }

    /// <summary>The weighted objective of <paramref name="bounds"/> with each cluster at its mean.</summary>
    public double Objective(int[] bounds) => Objective(bounds, Means(bounds, _ => 0));

    /// <summary>Sum of squared error of [a, b) around its mean: weighted, or unweighted for a cluster whose weights are all zero.</summary>
    private double Sse(int a, int b, bool weighted)
    {
        if (b - a < 2) return 0;
        if (weighted)
        {
            double w = _w[b] - _w[a];
            if (w <= 0) return 0;
            double wx = _wx[b] - _wx[a];
            return Math.Max(0, (_wxx[b] - _wxx[a]) - wx * wx / w);
        }
        double sx = _sx[b] - _sx[a];
        return Math.Max(0, (_sxx[b] - _sxx[a]) - sx * sx / (b - a));
    }

    /// <summary>One upscaling step: every cluster [a, b) splits at the cut minimizing the children's SSE; child 2c is the lower part.</summary>
    public int[] Split(int[] bounds)
    {
        int k = bounds.Length - 1;
        var next = new int[2 * k + 1];
        for (int c = 0; c < k; c++)
        {
            int a = bounds[c], b = bounds[c + 1], best = a;
            double bestSse = double.PositiveInfinity;
            bool weighted = _w[b] - _w[a] > 0;
            for (int s = a; s <= b; s++)
            {
                // Cut only between distinct values, so equal weights never get different codes.
                if (s > a && s < b && _x[s - 1] == _x[s]) continue;
                double sse = Sse(a, s, weighted) + Sse(s, b, weighted);
                if (sse < bestSse) { bestSse = sse; best = s; }
            }
            next[2 * c] = a;
            next[2 * c + 1] = best;
        }
        next[2 * k] = _n;
        return next;
    }

    /// <summary>Codes in the row's original element order for clusters <paramref name="bounds"/>.</summary>
    private byte[] CodesOf(int[] bounds)
    {
        var codes = new byte[_n];
        for (int c = 0; c + 1 < bounds.Length; c++)
            for (int i = bounds[c]; i < bounds[c + 1]; i++) codes[_order[i]] = (byte)c;
        return codes;
    }

    /// <summary>Deterministic weighted k-means++: the first centre drawn ∝ w, each next ∝ w·D².</summary>
    private double[] KMeansPlusPlus(int k, ulong seed)
    {
        var rng = new SplitMix64(seed);
        var centres = new List<double>(k);
        var mass = new double[_n];
        var d2 = new double[_n];
        bool weighted = _w[_n] > 0;
        // First centre: a draw from the weight distribution (uniform over elements if all weights are zero).
        for (int i = 0; i < _n; i++) mass[i] = weighted ? _w[i + 1] - _w[i] : 1;
        double first = _x[Draw(mass, rng.NextDouble() * (weighted ? _w[_n] : _n))];
        centres.Add(first);
        for (int i = 0; i < _n; i++) { double d = _x[i] - first; d2[i] = d * d; }
        var p = new double[_n];
        while (centres.Count < k)
        {
            double sum = 0;
            for (int i = 0; i < _n; i++) { p[i] = mass[i] * d2[i]; sum += p[i]; }
            if (sum <= 0) { centres.Add(centres[^1]); continue; } // every value is already a centre
            double next = _x[Draw(p, rng.NextDouble() * sum)];
            centres.Add(next);
            for (int i = 0; i < _n; i++) { double d = _x[i] - next; d2[i] = Math.Min(d2[i], d * d); }
        }
        centres.Sort();
        return [.. centres];
    }

    /// <summary>The first index whose running sum of <paramref name="mass"/> exceeds <paramref name="target"/> (the last with mass if rounding overshoots).</summary>
    private static int Draw(double[] mass, double target)
    {
        double acc = 0;
        int last = 0;
        for (int i = 0; i < mass.Length; i++)
        {
            if (mass[i] <= 0) continue;
            last = i;
            acc += mass[i];
            if (target < acc) return i;
        }
        return last;
    }

    /// <summary>
    /// Sorts a row by value with the permutation (LSD radix sort on order-preserving integer keys,
    /// three 11-bit passes: several times faster than a comparison sort at row widths of thousands).
    /// </summary>
    private static (float[] Sorted, int[] Order) SortWithIndex(ReadOnlySpan<float> values)
    {
        int n = values.Length;
        var keys = new uint[n];
        var order = new int[n];
        for (int i = 0; i < n; i++)
        {
            float v = values[i];
            if (!float.IsFinite(v)) throw new ArgumentException($"value {i} of the row is {v}; weights must be finite.", nameof(values));
            uint bits = BitConverter.SingleToUInt32Bits(v);
            // Negative floats sort reversed: flip all their bits; positive ones: flip the sign bit.
            keys[i] = (bits & 0x80000000) != 0 ? ~bits : bits | 0x80000000;
            order[i] = i;
        }
        var keys2 = new uint[n];
        var order2 = new int[n];
        Span<int> count = stackalloc int[2048];
        for (int shift = 0; shift < 32; shift += 11)
        {
            count.Clear();
            foreach (uint k in keys) count[(int)((k >> shift) & 2047)]++;
            int total = 0;
            for (int b = 0; b < 2048; b++) { int c = count[b]; count[b] = total; total += c; }
            for (int i = 0; i < n; i++)
            {
                int dst = count[(int)((keys[i] >> shift) & 2047)]++;
                keys2[dst] = keys[i];
                order2[dst] = order[i];
            }
            (keys, keys2) = (keys2, keys);
            (order, order2) = (order2, order);
        }
        var sorted = new float[n];
        for (int i = 0; i < n; i++) sorted[i] = values[order[i]];
        return (sorted, order);
    }
}

/// <summary>SplitMix64: a tiny, fast, seedable generator whose output is fixed for all platforms.</summary>
internal struct SplitMix64(ulong state)
{
    private ulong _state = state;

    public ulong Next()
    {
        ulong z = _state += 0x9E3779B97F4A7C15;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB;
        return z ^ (z >> 31);
    }

    /// <summary>Uniform in [0, 1).</summary>
    public double NextDouble() => (Next() >> 11) * (1.0 / (1UL << 53));

    /// <summary>A seed for item <paramref name="index"/> of a stream seeded with <paramref name="seed"/>, independent of processing order.</summary>
    public static ulong Derive(ulong seed, ulong index) => new SplitMix64(seed ^ (index * 0xD1B54A32D192ED03)).Next();
}
