using AnyPrecML.Models;
using AnyPrecML.Reference;

namespace AnyPrecML.Tests;

/// <summary>
/// An independent, deliberately naive float64 Llama forward pass over a whole sequence (no cache,
/// no vectorization, no shared code with the engine), used as the oracle for the fp32 engine.
/// </summary>
internal static class Float64Llama
{
    public static double[,] Logits(LlamaWeights w, int[] tokens)
    {
        var c = w.Config;
        int n = tokens.Length, d = c.Dim, hd = c.HeadDim;
        var x = new double[n, d];
        for (int t = 0; t < n; t++) for (int i = 0; i < d; i++) x[t, i] = w.Embedding[tokens[t] * d + i];
        foreach (var b in w.Blocks)
        {
            var h = Norm(x, b.AttentionNorm, c.RmsNormEps);
            var q = Linear(h, b.Wq, c.QDim);
            var k = Linear(h, b.Wk, c.KvDim);
            var v = Linear(h, b.Wv, c.KvDim);
            Rope(q, c.Heads, c); Rope(k, c.KvHeads, c);
            var att = new double[n, c.QDim];
            int group = c.Heads / c.KvHeads;
            for (int t = 0; t < n; t++)
                for (int head = 0; head < c.Heads; head++)
                {
                    int g = head / group;
                    var s = new double[t + 1];
                    double max = double.NegativeInfinity;
                    for (int p = 0; p <= t; p++)
                    {
                        double dot = 0;
                        for (int i = 0; i < hd; i++) dot += q[t, head * hd + i] * k[p, g * hd + i];
                        s[p] = dot / Math.Sqrt(hd);
                        max = Math.Max(max, s[p]);
                    }
                    double sum = 0;
                    for (int p = 0; p <= t; p++) { s[p] = Math.Exp(s[p] - max); sum += s[p]; }
                    for (int p = 0; p <= t; p++)
                        for (int i = 0; i < hd; i++) att[t, head * hd + i] += s[p] / sum * v[p, g * hd + i];
                }
            Add(x, Linear(att, b.Wo, d));
            var h2 = Norm(x, b.FfnNorm, c.RmsNormEps);
            var gate = Linear(h2, b.Gate, c.HiddenDim);
            var up = Linear(h2, b.Up, c.HiddenDim);
            for (int t = 0; t < n; t++)
                for (int i = 0; i < c.HiddenDim; i++) gate[t, i] = gate[t, i] / (1 + Math.Exp(-gate[t, i])) * up[t, i];
            Add(x, Linear(gate, b.Down, d));
        }
        return Linear(Norm(x, w.FinalNorm, c.RmsNormEps), w.Head, c.VocabSize);
    }

    private static double[,] Norm(double[,] x, float[] weight, double eps)
    {
        int n = x.GetLength(0), d = x.GetLength(1);
        var r = new double[n, d];
        for (int t = 0; t < n; t++)
        {
            double ss = 0;
            for (int i = 0; i < d; i++) ss += x[t, i] * x[t, i];
            double scale = 1 / Math.Sqrt(ss / d + eps);
            for (int i = 0; i < d; i++) r[t, i] = x[t, i] * scale * weight[i];
        }
        return r;
    }

    private static double[,] Linear(double[,] x, float[] w, int rows)
    {
        int n = x.GetLength(0), cols = x.GetLength(1);
        var y = new double[n, rows];
        for (int t = 0; t < n; t++)
            for (int r = 0; r < rows; r++)
            {
                double s = 0;
                for (int i = 0; i < cols; i++) s += x[t, i] * w[(long)r * cols + i];
                y[t, r] = s;
            }
        return y;
    }

    private static void Rope(double[,] v, int heads, LlamaConfig c)
    {
        int hd = c.HeadDim, half = hd / 2;
        for (int t = 0; t < v.GetLength(0); t++)
            for (int h = 0; h < heads; h++)
                for (int j = 0; j < half; j++)
                {
                    double angle = t * Math.Pow(c.RopeTheta, -2.0 * j / hd);
                    int a = h * hd + (c.RopeLayout == RopeLayout.Interleaved ? 2 * j : j);
                    int b = c.RopeLayout == RopeLayout.Interleaved ? a + 1 : a + half;
                    double x0 = v[t, a], x1 = v[t, b];
                    v[t, a] = x0 * Math.Cos(angle) - x1 * Math.Sin(angle);
                    v[t, b] = x0 * Math.Sin(angle) + x1 * Math.Cos(angle);
                }
    }

    private static void Add(double[,] x, double[,] y)
    {
        for (int t = 0; t < x.GetLength(0); t++) for (int i = 0; i < x.GetLength(1); i++) x[t, i] += y[t, i];
    }
}
