// Experiment (docs/QUALITY.md, "A joint seed"): is the AP/IND gap at b = 4, 5 the price of nesting
// or of the seed? Quantizes every block linear of stories260K with four seeds, each followed by the
// library's greedy exact 2-means splits: the exact seed; two "joint" seeds, the 8-cluster partition that
// minimizes Σ_d λ_d · (cost of the greedy subtree d levels below each cluster), solved exactly by an
// O(k·m²) DP over all runs (feasible on rows of 64–172 values, not on 1.1B-sized rows); and the
// independent optimum per width (IND). Prints perplexity b = 3..8 (the QUALITY.md protocol: calibration
// lines 1–9, evaluation 9 stories from line 11, first 256 tokens with BOS) and Σ w (x − q)² per width.
// Run from the repository root:
//   dotnet run -c Release scripts/joint-seed-experiment.cs fisher|hessian|uniform [first-eval-line] [stories]
#:project ../src/AnyPrecML/AnyPrecML.csproj
using AnyPrecML.Models;
using AnyPrecML.Quantization;
using AnyPrecML.Evaluation;
using AnyPrecML.Reference;

var source = LlamaCheckpoint.Open("../shared/models/stories260K/stories260K.bin");
var tok = AnyPrecML.Tokenization.LlamaTokenizerLoader.Load(source, "../shared/models/stories260K/tok512.model");
var all = File.ReadLines("../shared/data/tinystories/valid-sample.txt").ToArray();
var calib = CalibrationSet.FromText(tok, string.Join('\n', all.Take(9)), 9, 512, 512, "calib");
int evalStart = args.Length > 1 ? int.Parse(args[1]) : 11, evalCount = args.Length > 2 ? int.Parse(args[2]) : 9;
var evalDocs = PerplexityEvaluator.Documents(tok, string.Join('\n', all.Skip(evalStart - 1).Take(evalCount)), 256);
string kind = args.Length > 0 ? args[0] : "fisher";
var (sens, _) = SensitivitySources.Create(kind, ReferenceEngine.FromCheckpoint(source), calib);
var schemes = new (string Name, double[]? L)[] { ("exact", [1]), ("joint[1,1]", [1, 1]), ("joint[1,4,16]", [1, 4, 16]), ("IND", null) };
Console.WriteLine($"{kind} eval lines {evalStart}..{evalStart + evalCount - 1}: fp32 {PerplexityEvaluator.EvaluateSequences(new ReferenceEngine(LlamaWeights.FromCheckpoint(source)), evalDocs).Perplexity:F3}");
foreach (var (name, lambda) in schemes)
{
    // deq[layer,part][b-3] = dequantized weight in the checkpoint's own row order
    var deq = new Dictionary<(int, string), float[][]>();
    var objective = new double[6];
    for (int l = 0; l < source.Config.Layers; l++)
        foreach (var part in LlamaTensorNames.BlockLinears)
        {
            var shape = LlamaTensorNames.ShapeOf(source.Config, part);
            int R = (int)shape[0], C = (int)shape[1];
            var wt = source[LlamaTensorNames.Layer(l, part)].ToFloatArray();
            var s = sens.For(l, part, R, C);
            var outs = Enumerable.Range(0, 6).Select(_ => new float[R * C]).ToArray();
            Parallel.For(0, R, r =>
            {
                var x = Enumerable.Range(0, C).Select(j => (double)wt[r * C + j]).ToArray();
                var w = s.Row(r).ToArray().Select(v => (double)v).ToArray();
                var t = new Tree(x, w);
                for (int b = 0; b < 6; b++)
                {
                    var q = lambda is null ? t.IndependentValues(8 << b, x) : t.Values(lambda, b, x);
                    double e = 0;
                    bool unit = w.All(v => v == 0);
                    for (int j = 0; j < C; j++) { outs[b][r * C + j] = (float)(Half)q[j]; e += (unit ? 1 : w[j]) * (x[j] - q[j]) * (x[j] - q[j]); }
                    lock (objective) objective[b] += e;
                }
            });
            deq[(l, part)] = outs;
        }
    var ppl = new List<string>();
    for (int b = 0; b < 6; b++)
    {
        var weights = LlamaWeights.FromCheckpoint(source, (l, part) => deq[(l, part)][b]);
        ppl.Add($"{PerplexityEvaluator.EvaluateSequences(new ReferenceEngine(weights), evalDocs).Perplexity:F3}");
    }
    Console.WriteLine($"{kind} {name,-14} b=3..8 perplexity: {string.Join(" ", ppl)}");
    Console.WriteLine($"{kind} {name,-14} b=3..8 objective:  {string.Join(" ", objective.Select(o => o.ToString("E4")))}");
}

sealed class Tree
{
    readonly int m; readonly double[] W, X, XX, Vals; readonly double shift;
    public Tree(double[] x, double[] w)
    {
        var g = x.Select((v, i) => (v, w: w[i])).GroupBy(p => p.v).OrderBy(p => p.Key).Select(p => (x: p.Key, w: p.Sum(q => q.w))).ToArray();
        if (g.Sum(p => p.w) == 0) g = g.Select(p => (p.x, w: 1.0)).ToArray();
        m = g.Length; shift = g[m / 2].x; Vals = g.Select(p => p.x).ToArray();
        W = new double[m + 1]; X = new double[m + 1]; XX = new double[m + 1];
        for (int d = 0; d < m; d++) { double xx = g[d].x - shift; W[d + 1] = W[d] + g[d].w; X[d + 1] = X[d] + g[d].w * xx; XX[d + 1] = XX[d] + g[d].w * xx * xx; }
    }
    double Cost(int a, int b) { double dw = W[b] - W[a], dx = X[b] - X[a]; return dw > 0 ? Math.Max(0, XX[b] - XX[a] - dx * dx / dw) : 0; }
    double Mean(int a, int b) => W[b] - W[a] > 0 ? (X[b] - X[a]) / (W[b] - W[a]) + shift : Vals[a..b].Average();
    int Cut(int a, int b) { int best = a; double bv = double.PositiveInfinity; for (int s = a; s <= b; s++) { double v = Cost(a, s) + Cost(s, b); if (v < bv) { bv = v; best = s; } } return best; }
    double[] Assign(List<int> bounds, double[] x)
    {
        var res = new double[x.Length];
        for (int j = 0; j < x.Length; j++)
        {
            int d = Array.BinarySearch(Vals, x[j]);
            int c = 0; while (!(bounds[c] <= d && d < bounds[c + 1])) c++;
            res[j] = Mean(bounds[c], bounds[c + 1]);
        }
        return res;
    }
    public double[] Values(double[] lambda, int depth, double[] x)
    {
        int D = lambda.Length - 1;
        int[,] cut = new int[m + 1, m + 1];
        var g = new double[D + 1][,];
        for (int d = 0; d <= D; d++) g[d] = new double[m + 1, m + 1];
        for (int a = 0; a <= m; a++) for (int b = a; b <= m; b++) { g[0][a, b] = Cost(a, b); if (D > 0) cut[a, b] = Cut(a, b); }
        for (int d = 1; d <= D; d++)
            for (int a = 0; a <= m; a++) for (int b = a; b <= m; b++) { int s = cut[a, b]; g[d][a, b] = g[d - 1][a, s] + g[d - 1][s, b]; }
        double F(int a, int b) { double v = 0; for (int d = 0; d <= D; d++) v += lambda[d] * g[d][a, b]; return v; }
        var bounds = Seed(8, F);
        for (int b = 0; b < depth; b++)
        {
            var next = new List<int>();
            for (int c = 0; c + 1 < bounds.Count; c++) { next.Add(bounds[c]); next.Add(Cut(bounds[c], bounds[c + 1])); }
            next.Add(m); bounds = next;
        }
        return Assign(bounds.Where((v, i) => i == 0 || v != bounds[i - 1] || true).ToList(), x);
    }
    List<int> Seed(int k, Func<int, int, double> f)
    {
        if (m <= k) return Enumerable.Range(0, k + 1).Select(c => Math.Min(c, m)).ToList();
        var D = new double[k + 1, m + 1]; var arg = new int[k + 1, m + 1];
        for (int i = 0; i <= m; i++) D[1, i] = f(0, i);
        for (int j = 2; j <= k; j++)
            for (int i = 0; i <= m; i++)
            {
                D[j, i] = D[j - 1, i]; arg[j, i] = i;
                for (int t = 0; t < i; t++) { double v = D[j - 1, t] + f(t, i); if (v < D[j, i]) { D[j, i] = v; arg[j, i] = t; } }
            }
        var bounds = new int[k + 1]; bounds[k] = m;
        for (int j = k; j >= 2; j--) bounds[j - 1] = arg[j, bounds[j]];
        return bounds.ToList();
    }
    public double[] IndependentValues(int k, double[] x) => Assign(Seed(k, Cost), x);
}
