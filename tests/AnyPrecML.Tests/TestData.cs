using AnyPrecML.Models;
using AnyPrecML.Quantization;
using AnyPrecML.Reference;

namespace AnyPrecML.Tests;

/// <summary>The shared models and data (../shared beside the repository, or $ANYPREC_SHARED), and small helpers.</summary>
internal static class TestData
{
    private static readonly Lazy<string> SharedDir = new(() =>
    {
        string? env = Environment.GetEnvironmentVariable("ANYPREC_SHARED");
        if (!string.IsNullOrEmpty(env)) return env;
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null; d = d.Parent)
            if (File.Exists(Path.Combine(d.FullName, "AnyPrecML.sln")))
                return Path.Combine(d.Parent!.FullName, "shared");
        throw new DirectoryNotFoundException("AnyPrecML.sln not found above the test binaries; set ANYPREC_SHARED to the shared models folder.");
    });

    public static string Shared(params string[] parts)
    {
        string path = Path.Combine([SharedDir.Value, .. parts]);
        if (!File.Exists(path) && !Directory.Exists(path))
            throw new FileNotFoundException($"Shared test file '{path}' is missing: the tests read models and data from ../shared or $ANYPREC_SHARED.", path);
        return path;
    }

    public static string Stories260K => Shared("models", "stories260K", "stories260K.bin");
    public static string Tok512 => Shared("models", "stories260K", "tok512.model");
    public static string TinyStories => Shared("data", "tinystories", "valid-sample.txt");

    /// <summary>A fresh empty directory under the temp folder, deleted by the caller's using.</summary>
    public static TempDir NewTempDir() => new();

    /// <summary>stories260K quantized into <paramref name="directory"/> with uniform sensitivity (default options: seed 3, parent 8).</summary>
    public static void QuantizeStories260K(string directory, QuantizerOptions? options = null)
    {
        using var source = LlamaCheckpoint.Open(Stories260K);
        AnyPrecisionQuantizer.Quantize(source, directory, new UniformSensitivity(), options ?? new QuantizerOptions());
    }

    public sealed class TempDir : IDisposable
    {
        public string Path { get; } = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "anyprec-test-" + Guid.NewGuid().ToString("N")[..10]);
        public TempDir() => Directory.CreateDirectory(Path);
        public string this[string name] => System.IO.Path.Combine(Path, name);
        public void Dispose() { try { Directory.Delete(Path, true); } catch (IOException) { } }
    }

    /// <summary>A tiny random Llama with the given shape (weights ~ N(0, 0.3²), norms near 1).</summary>
    public static LlamaWeights RandomWeights(LlamaConfig c, int seed)
    {
        var rng = new Random(seed);
        float[] R(long n, float scale = 0.3f) { var a = new float[n]; for (long i = 0; i < n; i++) a[i] = (float)(Gaussian(rng) * scale); return a; }
        float[] Norm(int n) { var a = new float[n]; for (int i = 0; i < n; i++) a[i] = 1f + (float)(Gaussian(rng) * 0.1); return a; }
        var emb = R((long)c.VocabSize * c.Dim, 1f);
        return new LlamaWeights
        {
            Config = c,
            Embedding = emb,
            Blocks = Enumerable.Range(0, c.Layers).Select(_ => new BlockWeights
            {
                AttentionNorm = Norm(c.Dim),
                Wq = R((long)c.QDim * c.Dim), Wk = R((long)c.KvDim * c.Dim), Wv = R((long)c.KvDim * c.Dim), Wo = R((long)c.Dim * c.QDim),
                FfnNorm = Norm(c.Dim),
                Gate = R((long)c.HiddenDim * c.Dim), Up = R((long)c.HiddenDim * c.Dim), Down = R((long)c.Dim * c.HiddenDim),
            }).ToArray(),
            FinalNorm = Norm(c.Dim),
            Head = c.TiedEmbeddings ? emb : R((long)c.VocabSize * c.Dim),
        };
    }

    public static double Gaussian(Random rng) => Math.Sqrt(-2 * Math.Log(1 - rng.NextDouble())) * Math.Cos(2 * Math.PI * rng.NextDouble());

    public static LlamaConfig TinyConfig(bool tied = false, RopeLayout rope = RopeLayout.HalfSplit, int heads = 4, int kvHeads = 2) => new()
    {
        Dim = 32, HiddenDim = 48, Layers = 2, Heads = heads, KvHeads = kvHeads, HeadDim = 32 / heads, VocabSize = 37, MaxSeqLen = 64,
        RmsNormEps = 1e-5f, RopeTheta = 10000f, RopeLayout = rope, TiedEmbeddings = tied,
    };

    /// <summary>Logits of every position of <paramref name="tokens"/> from a fresh cache.</summary>
    public static float[] AllLogits(IInferenceEngine engine, int[] tokens)
    {
        var logits = new float[tokens.Length * engine.Config.VocabSize];
        engine.Forward(tokens, engine.CreateCache(), logits);
        return logits;
    }

    /// <summary>
    /// max |a[i] − b[i]|; a NaN on either side fails the test here. MSTest's IsLessThan compares through IComparable,
    /// where NaN orders below every number, so a NaN difference would pass every "IsLessThan(bound, diff)".
    /// </summary>
    public static double MaxAbsDiff(ReadOnlySpan<float> a, ReadOnlySpan<float> b)
    {
        Assert.AreEqual(a.Length, b.Length);
        double m = 0;
        for (int i = 0; i < a.Length; i++)
        {
            double d = Math.Abs((double)a[i] - b[i]);
            if (double.IsNaN(d)) Assert.Fail($"element {i}: {a[i]} against {b[i]}");
            m = Math.Max(m, d);
        }
        return m;
    }
}
