using AnyPrecML.Generation;
using AnyPrecML.Models;
using AnyPrecML.Reference;
using AnyPrecML.Tokenization;

namespace AnyPrecML.Tests;

[TestClass]
public sealed class GenerationTests
{
    private static LlamaCheckpoint _checkpoint = null!;
    private static TextGenerator _generator = null!;

    [ClassInitialize]
    public static void Load(TestContext _)
    {
        _checkpoint = LlamaCheckpoint.Open(TestData.Stories260K);
        _generator = new TextGenerator(ReferenceEngine.FromCheckpoint(_checkpoint), LlamaTokenizerLoader.Load(_checkpoint));
    }

    [ClassCleanup]
    public static void Unload() => _checkpoint.Dispose();

    [TestMethod]
    public void Greedy200StepsFromBosMatchLlama2c()
    {
        // llama2.c's test: 200 steps from BOS (position 0 is BOS, so 199 generated tokens).
        var result = _generator.Generate("", new GenerationOptions { MaxTokens = 199 });
        Assert.StartsWith("Once upon a time, there was a little girl named Lily. She loved to play outside in the park.", result.Text);
        Assert.AreEqual(199, result.Tokens);
        Assert.AreEqual("max_tokens", result.StopReason);
    }

    [TestMethod]
    public void PromptIsContinuedWithItsSpacing()
    {
        var result = _generator.Generate("Once upon a time", new GenerationOptions { MaxTokens = 12 });
        Assert.StartsWith(",", result.Text); // greedy continues "Once upon a time" with ", there was ..."
        StringAssert.Contains(result.Text, " there was");
    }

    [TestMethod]
    public void SeedFixesTheSampledText()
    {
        var o = new GenerationOptions { MaxTokens = 40, Temperature = 1f, TopP = 0.9f, Seed = 42 };
        string a = _generator.Generate("Lily", o).Text, b = _generator.Generate("Lily", o).Text;
        Assert.AreEqual(a, b);
        var others = Enumerable.Range(1, 4).Select(s => _generator.Generate("Lily", o with { Seed = (ulong)s }).Text).ToList();
        Assert.IsTrue(others.Any(t => t != a), "four other seeds all reproduced seed 42's text");
    }

    [TestMethod]
    public void TopKOneAndTinyTopPAreGreedy()
    {
        string greedy = _generator.Generate("The cat", new GenerationOptions { MaxTokens = 30 }).Text;
        Assert.AreEqual(greedy, _generator.Generate("The cat", new GenerationOptions { MaxTokens = 30, Temperature = 1.5f, TopK = 1, Seed = 5 }).Text);
        Assert.AreEqual(greedy, _generator.Generate("The cat", new GenerationOptions { MaxTokens = 30, Temperature = 1f, TopP = 1e-6f, Seed = 5 }).Text);
    }

    [TestMethod]
    public async Task StreamedPiecesJoinToTheWholeText()
    {
        var o = new GenerationOptions { MaxTokens = 60, Temperature = 0.8f, Seed = 9 };
        var pieces = new List<string>();
        await foreach (var piece in _generator.StreamAsync("Tom had a", o)) pieces.Add(piece);
        Assert.IsGreaterThan(10, pieces.Count);
        Assert.AreEqual(_generator.Generate("Tom had a", o).Text, string.Concat(pieces));
    }

    [TestMethod]
    public void StopsAtTheContext()
    {
        var result = _generator.Generate("", new GenerationOptions { MaxTokens = 2000, StopAtEos = false });
        Assert.AreEqual("context", result.StopReason);
        Assert.AreEqual(_checkpoint.Config.MaxSeqLen - 1, result.Tokens);
    }

    [TestMethod]
    public void InvalidOptionsAreRejected()
    {
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => _generator.Generate("x", new GenerationOptions { Temperature = -1 }));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => _generator.Generate("x", new GenerationOptions { TopP = 0 }));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => _generator.Generate("x", new GenerationOptions { MaxTokens = -1 }));
    }
}

[TestClass]
public sealed class SamplerTests
{
    [TestMethod]
    public void SamplesFollowTheSoftmaxWithinTopK()
    {
        float[] logits = [2f, 1f, 0.5f, -1f, 3f];
        var sampler = new Sampler(new GenerationOptions { Temperature = 1f, TopK = 3, Seed = 123 });
        var counts = new int[logits.Length];
        const int N = 40000;
        for (int i = 0; i < N; i++) counts[sampler.Next(logits)]++;
        // Top 3 are tokens 4, 0, 1 with probabilities ∝ e^3, e^2, e^1.
        double z = Math.Exp(3) + Math.Exp(2) + Math.Exp(1);
        Assert.AreEqual(0, counts[2] + counts[3]);
        foreach (var (token, logit) in new[] { (4, 3.0), (0, 2.0), (1, 1.0) })
        {
            double p = Math.Exp(logit) / z, sd = Math.Sqrt(p * (1 - p) / N);
            Assert.AreEqual(p, counts[token] / (double)N, 5 * sd, $"token {token}");
        }
    }

    [TestMethod]
    public void LowTemperatureOverLargeLogitsGivesTheFloat64Softmax()
    {
        // 30/0.1 = 300: e^300 overflows float (and e^x from x ≈ 88.7 on), so the softmax must subtract the maximum first.
        float[] logits = [30f, 0f, 29.9f, 12f];
        var sampler = new Sampler(new GenerationOptions { Temperature = 0.1f, Seed = 7 });
        var probs = new float[logits.Length];
        sampler.Distribution(logits, probs);
        double max = logits.Max() / 0.1, z = logits.Sum(l => Math.Exp(l / 0.1 - max));
        for (int i = 0; i < logits.Length; i++) Assert.AreEqual(Math.Exp(logits[i] / 0.1 - max) / z, probs[i], 1e-5, $"token {i}");
        var seen = new HashSet<int>();
        for (int i = 0; i < 2000; i++) seen.Add(sampler.Next(logits));
        CollectionAssert.AreEquivalent(new[] { 0, 2 }, seen.ToArray(), "e^-1 against 1: both drawn, the rest never");
    }

    [TestMethod]
    public void TopPKeepsTheSmallestNucleus()
    {
        float[] logits = [0f, (float)Math.Log(6), (float)Math.Log(3)]; // probabilities 0.1, 0.6, 0.3
        var sampler = new Sampler(new GenerationOptions { Temperature = 1f, TopP = 0.85f, Seed = 1 });
        var seen = new HashSet<int>();
        for (int i = 0; i < 5000; i++) seen.Add(sampler.Next(logits));
        CollectionAssert.AreEquivalent(new[] { 1, 2 }, seen.ToArray());
    }
}
