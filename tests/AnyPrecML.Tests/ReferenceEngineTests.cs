using AnyPrecML.Models;
using AnyPrecML.Reference;

namespace AnyPrecML.Tests;

[TestClass]
public sealed class ReferenceEngineTests
{
    public static IEnumerable<object[]> Shapes =>
    [
        [false, RopeLayout.HalfSplit, 4, 2],   // GQA, untied
        [true, RopeLayout.Interleaved, 4, 4],  // MHA, tied, llama2.c pairing
        [false, RopeLayout.Interleaved, 4, 1], // MQA
    ];

    [TestMethod]
    [DynamicData(nameof(Shapes))]
    public void LogitsMatchFloat64Reference(bool tied, RopeLayout rope, int heads, int kvHeads)
    {
        var w = TestData.RandomWeights(TestData.TinyConfig(tied, rope, heads, kvHeads), seed: 7);
        int[] tokens = [1, 5, 9, 36, 0, 2, 17, 17, 4, 30, 11, 8];
        var expected = Float64Llama.Logits(w, tokens);
        var actual = TestData.AllLogits(new ReferenceEngine(w), tokens);
        double maxRel = 0;
        for (int t = 0; t < tokens.Length; t++)
        {
            double scale = 0;
            for (int v = 0; v < w.Config.VocabSize; v++) scale = Math.Max(scale, Math.Abs(expected[t, v]));
            for (int v = 0; v < w.Config.VocabSize; v++)
                maxRel = Math.Max(maxRel, Math.Abs(actual[t * w.Config.VocabSize + v] - expected[t, v]) / scale);
        }
        Assert.IsFalse(double.IsNaN(maxRel), "NaN logits"); // IsLessThan orders NaN below every bound
        Assert.IsLessThan(1e-4, maxRel, $"max error relative to the row's largest logit: {maxRel:E2}");
    }

    [TestMethod]
    public void PrefillThenDecodeEqualsOneLongPrefill()
    {
        var engine = new ReferenceEngine(TestData.RandomWeights(TestData.TinyConfig(), seed: 3));
        int[] tokens = [1, 3, 5, 7, 11, 13, 17, 19, 23, 29];
        int vocab = engine.Config.VocabSize;
        var full = TestData.AllLogits(engine, tokens);

        var cache = engine.CreateCache();
        var logits = new float[vocab];
        engine.Forward(tokens.AsSpan(0, 4), cache, logits); // prefill 4, last-token logits
        Assert.IsLessThan(1e-5, TestData.MaxAbsDiff(logits, full.AsSpan(3 * vocab, vocab)));
        for (int t = 4; t < tokens.Length; t++)
        {
            engine.Forward(tokens.AsSpan(t, 1), cache, logits);
            Assert.IsLessThan(1e-5, TestData.MaxAbsDiff(logits, full.AsSpan(t * vocab, vocab)), $"position {t}");
        }
        Assert.AreEqual(tokens.Length, cache.Length);
    }

    [TestMethod]
    public void RejectsBadInputClearly()
    {
        var engine = new ReferenceEngine(TestData.RandomWeights(TestData.TinyConfig(), seed: 3));
        var cache = engine.CreateCache(4);
        var logits = new float[engine.Config.VocabSize];
        var e1 = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => engine.Forward([1, 99], cache, logits));
        StringAssert.Contains(e1.Message, "99");
        Assert.ThrowsExactly<ArgumentException>(() => engine.Forward([], cache, logits));
        Assert.ThrowsExactly<ArgumentException>(() => engine.Forward([1], cache, new float[5]));
        engine.Forward([1, 2, 3, 4], cache, logits);
        var e2 = Assert.ThrowsExactly<InvalidOperationException>(() => engine.Forward([1], cache, logits));
        StringAssert.Contains(e2.Message, "context full");
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => engine.CreateCache(engine.Config.MaxSeqLen + 1));
    }
}
