using System.Numerics;

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

    /// <summary>Σ w (x − centroid)² of the b-bit model over the row it quantized, in float64.</summary>
    public double Error(ReadOnlySpan<float> values, ReadOnlySpan<float> weights, int bits)
    {
        var table = Table(bits);
        int shift = ParentBits - bits;
        double total = 0;
        for (int j = 0; j < values.Length; j++) { double e = values[j] - (double)table[Codes[j] >> shift]; total += weights[j] * e * e; }
        return total;
    }
}

/// <summary>How the seed clusters of a row are found.</summary>
public enum SeedMethod
{
    /// <summary>The exactly optimal weighted 1-D k-means (dynamic programming over the sorted distinct values).</summary>
    Exact,
    /// <summary>Weighted greedy k-means++ (2 + ln k local trials per centre, seeded) then Lloyd to convergence: the usual heuristic, kept as a baseline.</summary>
    KMeans,
}

/// <summary>
/// Any-precision quantization of one row: a sensitivity-weighted 1-D k-means seed with 2^seed
/// centroids (SqueezeLLM), then incremental upscaling: every cluster splits in two by the exact
/// weighted 2-means over its members, one bit at a time, children coded 2c and 2c+1 (Any-Precision LLM).
///
/// Everything works on the row sorted once by value with equal values merged (their weights summed):
/// a cluster of an optimal 1-D clustering is a contiguous run of the sorted distinct values, so with
/// prefix sums of w, w·x and w·x² the cost of any run is O(1). That makes the seed solvable exactly
/// by dynamic programming (<see cref="SeedExact"/>), a split an exact scan over its cut points, and a
/// Lloyd step O(k log n). Equal values are one item, so they can never land in different clusters.
/// Clusters are half-open ranges [bounds[c], bounds[c+1]) of distinct-value indices.
/// </summary>
public sealed class RowQuantizer
{
    /// <summary>Lloyd iterations at most (the loop stops earlier once no boundary moves).</summary>
    public const int MaxIterations = 100;

    private readonly int _n;            // elements
    private readonly int _m;            // distinct values
    private readonly int[] _order;      // _order[i] = original index of the i-th smallest element
    private readonly int[] _start;      // distinct value d covers sorted elements [_start[d], _start[d+1])
    private readonly double[] _x;       // distinct values minus _shift (centred: prefix sums of x² stay accurate)
    private readonly double _shift;
    private readonly double[] _w, _wx, _wxx, _c, _sx, _sxx; // prefix sums over distinct values (weighted; and unweighted for zero-weight runs)

    /// <summary>Sorts <paramref name="values"/> with their <paramref name="weights"/> (sensitivities, ≥ 0), merges equal values and builds prefix sums.</summary>
    public RowQuantizer(ReadOnlySpan<float> values, ReadOnlySpan<float> weights) : this(values, weights, new RowBuffers()) { }

    /// <summary>
    /// As the public constructor, the row's arrays taken from <paramref name="buffers"/>: the thread's reusable ones for
    /// <see cref="Quantize"/> and <see cref="Cluster"/> (which finish with a row before the next starts on their thread),
    /// fresh ones for a quantizer someone holds.
    /// </summary>
    private RowQuantizer(ReadOnlySpan<float> values, ReadOnlySpan<float> weights, RowBuffers buffers)
    {
        if (values.Length != weights.Length) throw new ArgumentException($"{values.Length} values but {weights.Length} weights.");
        if (values.Length == 0) throw new ArgumentException("the row is empty.", nameof(values));
        _n = values.Length;
        _buffers = buffers;
        (var sorted, _order) = SortWithIndex(values, buffers);
        double total = 0;
        for (int i = 0; i < _n; i++)
        {
            double w = weights[i];
            if (!(w >= 0) || double.IsInfinity(w)) throw new ArgumentException($"sensitivity {w} at element {i} must be finite and ≥ 0.", nameof(weights));
            total += w;
        }
        // A row whose weights are all zero has no preference: cluster it by plain (unit-weight) k-means.
        bool unit = total == 0;
        _shift = sorted[_n / 2];
        _start = RowBuffers.Take(ref buffers.Start, _n + 1);
        int m = 0;
        for (int i = 0; i < _n; i++) if (i == 0 || sorted[i] != sorted[i - 1]) _start[m++] = i;
        _m = m;
        _start[m] = _n;
        _x = RowBuffers.Take(ref buffers.X, _m);
        _w = RowBuffers.Take(ref buffers.W, _m + 1);
        _wx = RowBuffers.Take(ref buffers.WX, _m + 1);
        _wxx = RowBuffers.Take(ref buffers.WXX, _m + 1);
        _c = RowBuffers.Take(ref buffers.C, _m + 1);
        _sx = RowBuffers.Take(ref buffers.SX, _m + 1);
        _sxx = RowBuffers.Take(ref buffers.SXX, _m + 1);
        _w[0] = _wx[0] = _wxx[0] = _c[0] = _sx[0] = _sxx[0] = 0;
        for (int d = 0; d < _m; d++)
        {
            double x = (double)sorted[_start[d]] - _shift, w = 0;
            for (int i = _start[d]; i < _start[d + 1]; i++) w += unit ? 1 : weights[_order[i]];
            double count = _start[d + 1] - _start[d];
            _x[d] = x;
            _w[d + 1] = _w[d] + w; _wx[d + 1] = _wx[d] + w * x; _wxx[d + 1] = _wxx[d] + w * x * x;
            _c[d + 1] = _c[d] + count; _sx[d + 1] = _sx[d] + count * x; _sxx[d + 1] = _sxx[d] + count * x * x;
        }
    }

    private readonly RowBuffers _buffers;

    /// <summary>
    /// One thread's arrays for the rows it quantizes one after another: a 1.1B model is ~400,000 rows, and fresh arrays
    /// for each (~300 KB at 2,048 columns) made the garbage collector's work and its page faults a sixth of the quantizer's
    /// time. Arrays only grow; every reader stays within the row's own lengths.
    /// </summary>
    private sealed class RowBuffers
    {
        public int[] Start = [], Order = [], Order2 = [];
        public uint[] Keys = [], Keys2 = [];
        public float[] Sorted = [];
        public double[] X = [], W = [], WX = [], WXX = [], C = [], SX = [], SXX = [], Prev = [], Cur = [];
        public int[][] Opt = [];

        [ThreadStatic] private static RowBuffers? t_current;

        /// <summary>The calling thread's buffers.</summary>
        public static RowBuffers Current => t_current ??= new RowBuffers();

        /// <summary><paramref name="array"/> when it holds <paramref name="length"/> elements, else a new one stored there (contents undefined).</summary>
        public static T[] Take<T>(ref T[] array, int length)
        {
            if (array.Length < length) array = GC.AllocateUninitializedArray<T>(Math.Max(length, array.Length + array.Length / 2));
            return array;
        }
    }

    /// <summary>Distinct values in the row: a seed of k ≥ this many clusters is exact and leaves clusters empty.</summary>
    public int DistinctValues => _m;

    /// <summary>Quantizes the row: the seed by <paramref name="method"/>, then upscaling to <paramref name="parentBits"/>.</summary>
    public static RowQuantization Quantize(ReadOnlySpan<float> values, ReadOnlySpan<float> weights, int seedBits, int parentBits, ulong seed, SeedMethod method = SeedMethod.Exact)
    {
        var q = new RowQuantizer(values, weights, RowBuffers.Current);
        var clusters = q.Seed(1 << seedBits, method, seed);
        var centroids = new float[parentBits - seedBits + 1][];
        var c = q.SeedCentroids(clusters);
        centroids[0] = q.InRowUnits(c);
        for (int b = seedBits + 1; b <= parentBits; b++)
        {
            clusters = q.Split(clusters);
            var parents = c;
            // An empty child (a cluster of one distinct value) keeps its parent's centroid.
            c = q.Means(clusters, i => parents[i >> 1]);
            centroids[b - seedBits] = q.InRowUnits(c);
        }
        return new RowQuantization(q.CodesOf(clusters), centroids, seedBits, parentBits);
    }

    /// <summary>One 1-D clustering with <paramref name="k"/> clusters alone (the "independent" model at log2(k) bits): codes and centroids.</summary>
    public static (byte[] Codes, float[] Centroids) Cluster(ReadOnlySpan<float> values, ReadOnlySpan<float> weights, int k, SeedMethod method, ulong seed)
    {
        var q = new RowQuantizer(values, weights, RowBuffers.Current);
        var clusters = q.Seed(k, method, seed);
        return (q.CodesOf(clusters), q.InRowUnits(q.SeedCentroids(clusters)));
    }

    /// <summary>The seed clusters by <paramref name="method"/> (<paramref name="seed"/> feeds k-means++ only).</summary>
    public int[] Seed(int k, SeedMethod method, ulong seed) => method switch
    {
        SeedMethod.Exact => SeedExact(k),
        SeedMethod.KMeans => SeedKMeans(k, seed),
        _ => throw new ArgumentOutOfRangeException(nameof(method), method, "unknown seed method."),
    };

    /// <summary>
    /// The exactly optimal weighted k-means of the row: D[j][i], the least cost of the first i distinct
    /// values in j clusters, is min over t of D[j-1][t] + cost(t, i). The cost of a run satisfies the
    /// quadrangle inequality, so the best t is non-decreasing in i and each layer is solved by divide and
    /// conquer (Monge / "D&amp;C optimization"): O(k·m log m) cost evaluations for m distinct values.
    /// With fewer distinct values than clusters every value is its own cluster and the rest stay empty
    /// (at the top, with the largest centroid).
    /// </summary>
    public int[] SeedExact(int k)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(k, 1);
        int m = _m;
        var bounds = new int[k + 1];
        if (m <= k)
        {
            for (int c = 0; c <= k; c++) bounds[c] = Math.Min(c, m);
            return bounds;
        }
        var prev = RowBuffers.Take(ref _buffers.Prev, m + 1);
        var cur = RowBuffers.Take(ref _buffers.Cur, m + 1);
        var opt = RowBuffers.Take(ref _buffers.Opt, k + 1);
        for (int j = 0; j <= k; j++) opt[j] ??= []; // a grown array of rows starts with none
        for (int i = 1; i <= m; i++) prev[i] = Cost(0, i);
        for (int j = 2; j <= k; j++)
        {
            // Clusters are non-empty: j clusters cover i ∈ [j, m - (k - j)], the last starting at t ∈ [j - 1, i - 1].
            int lo = j, hi = m - (k - j);
            // Zeroed: the next layer reads one entry past this one's range as "no bound" (0).
            var arg = opt[j] = RowBuffers.Take(ref opt[j], m + 1);
            Array.Clear(arg, 0, m + 1);
            // With one cluster more, the last one starts no earlier (opt[j-1][i] ≤ opt[j][i]): a second bound that narrows the scans.
            var lower = j > 2 ? opt[j - 1] : null;
            if (j == k) Solve(prev, cur, arg, lower, m, m, k - 1, m - 1);
            else Solve(prev, cur, arg, lower, lo, hi, j - 1, hi - 1);
            (prev, cur) = (cur, prev);
        }
        bounds[k] = m;
        for (int j = k; j >= 2; j--) bounds[j - 1] = opt[j][bounds[j]];
        bounds[0] = 0;
        return bounds;
    }

    /// <summary>
    /// cur[i] = min over t ∈ [max(tLo, lower[i]), min(tHi, i - 1)] of prev[t] + cost(t, i) for i ∈ [iLo, iHi],
    /// with the best t in arg[i] (the smallest on ties); lower[i] is the previous layer's best start where it has one.
    /// </summary>
    private void Solve(double[] prev, double[] cur, int[] arg, int[]? lower, int iLo, int iHi, int tLo, int tHi)
    {
        if (iLo > iHi) return;
        if (iHi - iLo < 8)
        {
            // A short run of i: scan them in order, each from the previous best (the same monotone bound), without recursing.
            for (int i = iLo; i <= iHi; i++)
            {
                cur[i] = Best(prev, lower, i, tLo, tHi, out arg[i]);
                tLo = arg[i];
            }
            return;
        }
        int mid = (iLo + iHi) >> 1;
        cur[mid] = Best(prev, lower, mid, tLo, tHi, out int bestT);
        arg[mid] = bestT;
        Solve(prev, cur, arg, lower, iLo, mid - 1, tLo, bestT);
        Solve(prev, cur, arg, lower, mid + 1, iHi, bestT, tHi);
    }

    /// <summary>min over t ∈ [max(tLo, lower[i]), min(tHi, i - 1)] of prev[t] + cost(t, i), and the smallest t reaching it.</summary>
    private double Best(double[] prev, int[]? lower, int i, int tLo, int tHi, out int bestT)
    {
        double wi = _w[i], wxi = _wx[i], wxxi = _wxx[i];
        double best = double.PositiveInfinity;
        int end = Math.Min(tHi, i - 1);
        int t = lower is not null && lower[i] > tLo && lower[i] <= end ? lower[i] : tLo;
        bestT = t;
        // The scan is the whole cost of the seed: SIMD lanes keep their own first minimum, then the
        // smallest t among the lanes' equal minima wins, so ties resolve as in the scalar loop.
        int lanes = Vector<double>.Count;
        if (end - t + 1 >= 2 * lanes)
        {
            var vBest = new Vector<double>(double.PositiveInfinity);
            var vArg = Vector<long>.Zero;
            var vT = Vector<long>.Zero;
            for (int l = 0; l < lanes; l++) vT = vT.WithElement(l, t + l);
            var step = new Vector<long>(lanes);
            Vector<double> vwi = new(wi), vwxi = new(wxi), vwxxi = new(wxxi), tiny = new(double.Epsilon);
            for (; t + lanes - 1 <= end; t += lanes, vT += step)
            {
                var dw = vwi - new Vector<double>(_w.AsSpan(t));
                var dwx = vwxi - new Vector<double>(_wx.AsSpan(t));
                var v = new Vector<double>(prev.AsSpan(t)) + (vwxxi - new Vector<double>(_wxx.AsSpan(t))) - dwx * dwx / Vector.Max(dw, tiny);
                var better = Vector.LessThan(v, vBest);
                vBest = Vector.ConditionalSelect(better, v, vBest);
                vArg = Vector.ConditionalSelect(better, vT, vArg);
            }
            for (int l = 0; l < lanes; l++)
            {
                double lv = vBest[l];
                if (lv < best || (lv == best && vArg[l] < bestT)) { best = lv; bestT = (int)vArg[l]; }
            }
        }
        for (; t <= end; t++)
        {
            // Weighted SSE of run [t, i): Σw·x² − (Σw·x)²/Σw; a run of zero weight costs nothing (then Σw·x = 0 too).
            double dw = wi - _w[t], dwx = wxi - _wx[t];
            double v = prev[t] + (wxxi - _wxx[t]) - dwx * dwx / Math.Max(dw, double.Epsilon);
            if (v < best) { best = v; bestT = t; }
        }
        return best;
    }

    /// <summary>Weighted SSE of the run of distinct values [a, b) around its weighted mean.</summary>
    private double Cost(int a, int b)
    {
        double dw = _w[b] - _w[a], dwx = _wx[b] - _wx[a];
        return dw > 0 ? (_wxx[b] - _wxx[a]) - dwx * dwx / dw : 0;
    }

    /// <summary>
    /// Weighted Lloyd's k-means from a deterministic greedy weighted k-means++ start (the baseline seed).
    /// <paramref name="onIteration"/> receives the weighted objective after each update step.
    /// </summary>
    public int[] SeedKMeans(int k, ulong seed, Action<double>? onIteration = null)
    {
        var c = KMeansPlusPlus(k, seed);
        var bounds = Assign(c);
        for (int it = 0; it < MaxIterations; it++)
        {
            c = Means(bounds, i => c[i]);
            onIteration?.Invoke(Objective(bounds, c));
            var next = Assign(c);
            if (next.AsSpan().SequenceEqual(bounds)) return bounds;
            bounds = next;
        }
        return bounds;
    }

    /// <summary>Boundaries of the nearest-centroid clusters for ascending centroids <paramref name="c"/>.</summary>
    private int[] Assign(double[] c)
    {
        int k = c.Length;
        var bounds = new int[k + 1];
        bounds[k] = _m;
        for (int i = 1; i < k; i++)
        {
            // Values ≤ the midpoint go to the lower centroid.
            double mid = 0.5 * (c[i - 1] + c[i]);
            int lo = bounds[i - 1], hi = _m;
            while (lo < hi) { int mm = (lo + hi) >> 1; if (_x[mm] <= mid) lo = mm + 1; else hi = mm; }
            bounds[i] = lo;
        }
        return bounds;
    }

    /// <summary>Centroids of seed clusters: an empty cluster takes the centroid below it (cluster 0 is never empty).</summary>
    private double[] SeedCentroids(int[] bounds)
    {
        var c = new double[bounds.Length - 1];
        for (int i = 0; i < c.Length; i++) c[i] = Mean(bounds[i], bounds[i + 1]) ?? (i > 0 ? c[i - 1] : 0);
        return c;
    }

    /// <summary>Centred centroids (as <see cref="_x"/>) back in the row's units, as stored.</summary>
    private float[] InRowUnits(double[] c) => Array.ConvertAll(c, v => (float)(v + _shift));

    /// <summary>Centred mean of each cluster: weighted; unweighted where all its weights are zero; <paramref name="empty"/>(c) where it has no members.</summary>
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
        return w > 0 ? (_wx[b] - _wx[a]) / w : (_sx[b] - _sx[a]) / (_c[b] - _c[a]);
    }

    /// <summary>Σ w (x - c)² over all clusters, with centred centroids <paramref name="c"/>.</summary>
    private double Objective(int[] bounds, double[] c)
    {
        double total = 0;
        for (int i = 0; i + 1 < bounds.Length; i++)
        {
            int a = bounds[i], b = bounds[i + 1];
            double ci = c[i];
            total += (_wxx[b] - _wxx[a]) - 2 * ci * (_wx[b] - _wx[a]) + ci * ci * (_w[b] - _w[a]);
        }
        return total;
    }

    /// <summary>The weighted objective of <paramref name="bounds"/> with each cluster at its mean.</summary>
    public double Objective(int[] bounds)
    {
        double total = 0;
        for (int i = 0; i + 1 < bounds.Length; i++) total += Math.Max(0, Cost(bounds[i], bounds[i + 1]));
        return total;
    }

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
        return Math.Max(0, (_sxx[b] - _sxx[a]) - sx * sx / (_c[b] - _c[a]));
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
                double sse = Sse(a, s, weighted) + Sse(s, b, weighted);
                if (sse < bestSse) { bestSse = sse; best = s; }
            }
            next[2 * c] = a;
            next[2 * c + 1] = best;
        }
        next[2 * k] = _m;
        return next;
    }

    /// <summary>Codes in the row's original element order for clusters <paramref name="bounds"/> (at most 256).</summary>
    public byte[] CodesOf(int[] bounds)
    {
        var codes = new byte[_n];
        for (int c = 0; c + 1 < bounds.Length; c++)
            for (int i = _start[bounds[c]]; i < _start[bounds[c + 1]]; i++) codes[_order[i]] = (byte)c;
        return codes;
    }

    /// <summary>
    /// Deterministic greedy weighted k-means++ (Arthur and Vassilvitskii; the greedy variant of scikit-learn):
    /// the first centre drawn ∝ w, each next one the best by potential Σ w·D² of 2 + ⌊ln k⌋ candidates drawn ∝ w·D².
    /// </summary>
    private double[] KMeansPlusPlus(int k, ulong seed)
    {
        var rng = new SplitMix64(seed);
        int trials = 2 + (int)Math.Log(k);
        var centres = new List<double>(k);
        var mass = new double[_m];
        var d2 = new double[_m];
        var p = new double[_m];
        for (int d = 0; d < _m; d++) mass[d] = _w[d + 1] - _w[d];
        double first = _x[Draw(mass, rng.NextDouble() * _w[_m])];
        centres.Add(first);
        for (int d = 0; d < _m; d++) { double e = _x[d] - first; d2[d] = e * e; }
        while (centres.Count < k)
        {
            double sum = 0;
            for (int d = 0; d < _m; d++) { p[d] = mass[d] * d2[d]; sum += p[d]; }
            if (sum <= 0) { centres.Add(centres[^1]); continue; } // every value is already a centre
            double bestPotential = double.PositiveInfinity, bestCentre = 0;
            for (int t = 0; t < trials; t++)
            {
                double candidate = _x[Draw(p, rng.NextDouble() * sum)], potential = 0;
                for (int d = 0; d < _m; d++) { double e = _x[d] - candidate; potential += mass[d] * Math.Min(d2[d], e * e); }
                if (potential < bestPotential) { bestPotential = potential; bestCentre = candidate; }
            }
            centres.Add(bestCentre);
            for (int d = 0; d < _m; d++) { double e = _x[d] - bestCentre; d2[d] = Math.Min(d2[d], e * e); }
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
    /// Sorts a row by value with the permutation: LSD radix sort on order-preserving integer keys,
    /// several times faster than a comparison sort at row widths of thousands. Only the key bits that
    /// differ somewhere in the row are sorted on, in as few passes of at most 11 bits as they need:
    /// bf16 weights (the low 16 bits zero) take two 8-bit passes instead of three 11-bit ones.
    /// </summary>
    private static (float[] Sorted, int[] Order) SortWithIndex(ReadOnlySpan<float> values, RowBuffers buffers)
    {
        int n = values.Length;
        var keys = RowBuffers.Take(ref buffers.Keys, n);
        var order = RowBuffers.Take(ref buffers.Order, n);
        uint first = 0, differ = 0;
        for (int i = 0; i < n; i++)
        {
            float v = values[i];
            if (!float.IsFinite(v)) throw new ArgumentException($"value {i} of the row is {v}; weights must be finite.", nameof(values));
            uint bits = BitConverter.SingleToUInt32Bits(v);
            // Negative floats sort reversed: 2^31 − magnitude (low zero bits stay zero, unlike ~bits); positive ones: 2^31 + magnitude.
            uint key = (bits & 0x80000000) != 0 ? 0x80000000 - (bits & 0x7FFFFFFF) : bits | 0x80000000;
            keys[i] = key;
            order[i] = i;
            if (i == 0) first = key;
            differ |= key ^ first;
        }
        if (differ != 0)
        {
            int low = BitOperations.TrailingZeroCount(differ), span = 32 - BitOperations.LeadingZeroCount(differ) - low;
            int passes = (span + 10) / 11, digit = (span + passes - 1) / passes, buckets = 1 << digit;
            uint mask = (uint)buckets - 1;
            var keys2 = RowBuffers.Take(ref buffers.Keys2, n);
            var order2 = RowBuffers.Take(ref buffers.Order2, n);
            Span<int> count = stackalloc int[buckets];
            for (int pass = 0, shift = low; pass < passes; pass++, shift += digit)
            {
                count.Clear();
                for (int i = 0; i < n; i++) count[(int)((keys[i] >> shift) & mask)]++;
                int total = 0;
                for (int b = 0; b < buckets; b++) { int c = count[b]; count[b] = total; total += c; }
                for (int i = 0; i < n; i++)
                {
                    int dst = count[(int)((keys[i] >> shift) & mask)]++;
                    keys2[dst] = keys[i];
                    order2[dst] = order[i];
                }
                (keys, keys2) = (keys2, keys);
                (order, order2) = (order2, order);
            }
        }
        var sorted = RowBuffers.Take(ref buffers.Sorted, n);
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
