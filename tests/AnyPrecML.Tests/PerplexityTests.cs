using AnyPrecML.Evaluation;
using AnyPrecML.Models;
using AnyPrecML.Reference;
using AnyPrecML.Tokenization;

namespace AnyPrecML.Tests;

[TestClass]
public sealed class PerplexityTests
{
    [TestMethod]
    public void Stories260KOnTinyStoriesIsAbout5Point3()
    {
        using var cp = LlamaCheckpoint.Open(TestData.Stories260K);
        var engine = ReferenceEngine.FromCheckpoint(cp);
        var tok = LlamaTokenizerLoader.Load(cp);
        // One story per line, each starting with BOS as in training; windows of the model's 512.
        var r = PerplexityEvaluator.Evaluate(engine, tok, File.ReadAllText(TestData.TinyStories), bosPerLine: true);
        Assert.AreEqual(1.66, r.Nll, 0.06, $"nll {r.Nll:F4}, perplexity {r.Perplexity:F3}");
        Assert.AreEqual(5.3, r.Perplexity, 0.3);
        Assert.IsGreaterThan(15000, r.Tokens);
    }

    [TestMethod]
    public void WindowedNllEqualsADirectSumOverWindows()
    {
        var engine = new ReferenceEngine(TestData.RandomWeights(TestData.TinyConfig(), seed: 21));
        var rng = new Random(4);
        var tokens = Enumerable.Range(0, 45).Select(_ => rng.Next(37)).ToArray();
        var r = PerplexityEvaluator.Evaluate(engine, tokens, contextLength: 16);

        // Windows [0,16), [16,32), [32,45): each scores all its tokens after the first.
        double total = 0; long count = 0;
        foreach (var (start, len) in new[] { (0, 16), (16, 16), (32, 13) })
        {
            var w = tokens[start..(start + len)];
            var logits = Float64Llama.Logits(engine.Weights, w);
            for (int t = 0; t + 1 < len; t++)
            {
                double max = double.NegativeInfinity, sum = 0;
                for (int v = 0; v < 37; v++) max = Math.Max(max, logits[t, v]);
                for (int v = 0; v < 37; v++) sum += Math.Exp(logits[t, v] - max);
                total += Math.Log(sum) + max - logits[t, w[t + 1]];
                count++;
            }
        }
        Assert.AreEqual(count, r.Tokens);
        Assert.AreEqual(3, r.Windows);
        Assert.AreEqual(total / count, r.Nll, 1e-4);
    }

    [TestMethod]
    public void TruncatedDocumentsAreEachScoredAloneOnTheirFirstNTokens()
    {
        using var cp = LlamaCheckpoint.Open(TestData.Stories260K);
        var engine = ReferenceEngine.FromCheckpoint(cp);
        var tok = LlamaTokenizerLoader.Load(cp);
        var lines = File.ReadLines(TestData.TinyStories).Skip(10).Take(3).ToArray();
        var docs = PerplexityEvaluator.Documents(tok, string.Join("\n\n", lines), truncate: 40);
        Assert.HasCount(3, docs);
        var r = PerplexityEvaluator.EvaluateSequences(engine, docs);

        // Reference: each line tokenized on its own, BOS first, its first 40 tokens scored in float64 from nothing before.
        double total = 0; long count = 0;
        foreach (var line in lines)
        {
            var ids = tok.EncodeToIds(line).Take(40).ToArray();
            Assert.AreEqual(cp.Config.BosTokenId, ids[0]);
            var logits = Float64Llama.Logits(engine.Weights, ids);
            for (int t = 0; t + 1 < ids.Length; t++)
            {
                double max = double.NegativeInfinity, sum = 0;
                for (int v = 0; v < cp.Config.VocabSize; v++) max = Math.Max(max, logits[t, v]);
                for (int v = 0; v < cp.Config.VocabSize; v++) sum += Math.Exp(logits[t, v] - max);
                total += Math.Log(sum) + max - logits[t, ids[t + 1]];
                count++;
            }
        }
        Assert.AreEqual(3 * 39, r.Tokens);
        Assert.AreEqual(count, r.Tokens);
        Assert.AreEqual(total / count, r.Nll, 1e-4);
    }

    [TestMethod]
    public void CalibrationIsOneDocumentPerSequenceTruncatedWithBosFirst()
    {
        using var cp = LlamaCheckpoint.Open(TestData.Stories260K);
        var tok = LlamaTokenizerLoader.Load(cp);
        var lines = File.ReadLines(TestData.TinyStories).Take(9).ToArray();
        var set = AnyPrecML.Quantization.CalibrationSet.FromText(tok, string.Join('\n', lines), samples: 5, sequenceLength: 100, maxSeqLen: 512, "test");
        Assert.HasCount(5, set.Sequences);
        for (int i = 0; i < 5; i++)
        {
            var whole = tok.EncodeToIds(lines[i]).ToArray();
            CollectionAssert.AreEqual(whole.Take(100).ToArray(), set.Sequences[i], $"document {i}");
        }
        Assert.AreEqual(set.Sequences.Sum(q => q.Length), set.Tokens);
        // The cap is the model's context.
        Assert.AreEqual(512, AnyPrecML.Quantization.CalibrationSet.FromText(tok, lines[9 - 1], 1, 4096, 512, "t").SequenceLength);
    }

    [TestMethod]
    public void EmptyOrTooShortTextIsAClearError()
    {
        using var cp = LlamaCheckpoint.Open(TestData.Stories260K);
        var engine = ReferenceEngine.FromCheckpoint(cp);
        var tok = LlamaTokenizerLoader.Load(cp);
        StringAssert.Contains(Assert.ThrowsExactly<ArgumentException>(() => PerplexityEvaluator.Evaluate(engine, tok, "")).Message, "empty");
        StringAssert.Contains(Assert.ThrowsExactly<ArgumentException>(() => PerplexityEvaluator.Evaluate(engine, tok, "  \n ")).Message, "empty");
        Assert.ThrowsExactly<ArgumentException>(() => PerplexityEvaluator.Evaluate(engine, [1], 16));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => PerplexityEvaluator.Evaluate(engine, [1, 2, 3], 100000));
    }
}
