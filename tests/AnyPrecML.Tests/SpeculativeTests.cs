using System.Numerics.Tensors;
using System.Text.Json;
using AnyPrecML.Generation;
using AnyPrecML.Models;
using AnyPrecML.Onnx;
using AnyPrecML.Quantization;
using AnyPrecML.Reference;
using AnyPrecML.Tokenization;
using Microsoft.ML.Tokenizers;

namespace AnyPrecML.Tests;

[TestClass]
public sealed class SpeculativeTests
{
    private static TestData.TempDir _dir = null!;
    private static AnyPrecisionModel _model = null!;
    private static AnyPrecisionReferenceEngine _engine = null!;
    private static LlamaTokenizer _tok = null!;

    [ClassInitialize]
    public static void QuantizeOnce(TestContext _)
    {
        _dir = TestData.NewTempDir();
        TestData.QuantizeStories260K(_dir["ap"]);
        _model = AnyPrecisionModel.Open(_dir["ap"]);
        _engine = new AnyPrecisionReferenceEngine(_model);
        _tok = LlamaTokenizerLoader.Load(_model.Checkpoint);
    }

    [ClassCleanup]
    public static void Cleanup()
    {
        _model.Dispose();
        _dir.Dispose();
    }

    /// <summary>BOS and the tokens of <paramref name="text"/>, as TextGenerator encodes a prompt.</summary>
    private static int[] Prompt(string text)
    {
        List<int> ids = [.. _tok.EncodeToIds(text)];
        if (ids.Count == 0 || ids[0] != _model.Config.BosTokenId) ids.Insert(0, _model.Config.BosTokenId);
        return [.. ids];
    }

    /// <summary>Greedy tokens of plain decoding, one forward pass per token: the reference speculative decoding must equal.</summary>
    private static List<int> TargetOnlyGreedy(IAnyPrecisionEngine engine, int bits, int[] prompt, int count)
    {
        var cache = engine.CreateCache();
        var logits = new float[engine.Config.VocabSize];
        // The prompt's last token as a decode step, as a verification pass feeds it (see TextGenerator.TargetOnly).
        if (prompt.Length > 1) engine.Forward(prompt.AsSpan(0, prompt.Length - 1), cache, new float[engine.Config.VocabSize], bits);
        engine.Forward(prompt.AsSpan(prompt.Length - 1), cache, logits, bits);
        var tokens = new List<int>();
        for (int i = 0; i < count; i++)
        {
            int next = TensorPrimitives.IndexOfMax(logits);
            tokens.Add(next);
            if (i + 1 < count) engine.Forward([next], cache, logits, bits);
        }
        return tokens;
    }

    /// <summary>The first <paramref name="count"/> tokens of speculative decoding, round by round.</summary>
    private static (List<int> Tokens, SpeculativeGenerator Generator) Speculative(IAnyPrecisionEngine engine, int[] prompt, GenerationOptions options, int target, int count)
    {
        var generator = new SpeculativeGenerator(engine, prompt, options, new Sampler(options), target, capacity: Math.Min(engine.Config.MaxSeqLen, prompt.Length + count + options.DraftTokens));
        var tokens = new List<int>();
        while (tokens.Count < count) tokens.AddRange(generator.NextRound());
        return (tokens.Take(count).ToList(), generator);
    }

    [TestMethod]
    public void GreedySpeculativeEqualsTargetOnlyGreedyFor200TokensAtEveryDraftTargetPairAndK()
    {
        var seen = new List<string>();
        int[] prompt = Prompt("Lily and Tom");
        foreach (int t in _model.SupportedBits.Skip(1))
        {
            // Through TextGenerator, EOS not stopping: the path the CLI and the library take.
            var plain = new GenerationOptions { MaxTokens = 200, StopAtEos = false };
            _engine.Bits = t;
            var expected = new TextGenerator(_engine, _tok).GenerateTokens("Lily and Tom", plain).Select(s => s.Id).ToList();
            Assert.AreEqual(200, expected.Count);
            CollectionAssert.AreEqual(expected, TargetOnlyGreedy(_engine, t, prompt, 200), "TextGenerator's target-only decoding is the plain loop");
            for (int d = _model.SeedBits; d < t; d++)
                foreach (int k in new[] { 1, 4, 8 })
                {
                    var options = plain with { DraftBits = d, DraftTokens = k };
                    var result = new TextGenerator(_engine, _tok).Generate("Lily and Tom", options);
                    var actual = new TextGenerator(_engine, _tok).GenerateTokens("Lily and Tom", options).Select(s => s.Id).ToList();
                    CollectionAssert.AreEqual(expected, actual, $"d={d} t={t} k={k}");
                    var s = result.Speculation!;
                    Assert.AreEqual((d, t), (s.DraftBits, s.TargetBits));
                    Assert.IsLessThanOrEqualTo(s.Drafted, s.Accepted);
                    Assert.IsLessThanOrEqualTo((long)k * s.TargetSteps, s.Drafted);
                    // Every round commits accepted + 1 tokens: the counts must add up to what came out (the last round may overshoot).
                    Assert.IsGreaterThanOrEqualTo(200L, s.Accepted + s.TargetSteps, $"d={d} t={t} k={k}");
                    Assert.IsLessThanOrEqualTo(200L + k, s.Accepted + s.TargetSteps, $"d={d} t={t} k={k}");
                    Assert.IsLessThanOrEqualTo(s.TargetSteps, s.Rejected, "at most one rejection a round");
                    seen.Add($"{d}/{t}/{k}: {s.AcceptanceRate:F2}");
                }
        }
        Assert.HasCount(15 * 3, seen);
        // An adaptive draft length changes how much is drafted, never the output.
        var adaptive = new GenerationOptions { MaxTokens = 200, StopAtEos = false, DraftBits = 3, DraftTokens = 8, DraftThreshold = 0.6f };
        _engine.Bits = 8;
        var fixedRun = new TextGenerator(_engine, _tok).Generate("Lily and Tom", adaptive with { DraftThreshold = 0 });
        var adaptiveRun = new TextGenerator(_engine, _tok).Generate("Lily and Tom", adaptive);
        Assert.AreEqual(fixedRun.Text, adaptiveRun.Text);
        Assert.IsLessThan(fixedRun.Speculation!.Drafted, adaptiveRun.Speculation!.Drafted);
        Assert.IsGreaterThan(fixedRun.Speculation.AcceptanceRate, adaptiveRun.Speculation.AcceptanceRate);
    }

    [TestMethod]
    public void GreedySpeculativeEqualsTargetOnlyOnASyntheticGqaModelInBothEngines()
    {
        // Heads 16 wide: the ONNX graph's fused attention (rotation inside GroupQueryAttention) sees every rollback.
        using var model = SyntheticGqaModel("gqa");
        Assert.AreEqual(4, model.Config.Heads / model.Config.KvHeads);
        Assert.IsTrue(DecoderGraph.FusedAttention(model.Config));
        using var onnx = new OnnxEngine(model);
        foreach (IAnyPrecisionEngine engine in new IAnyPrecisionEngine[] { new AnyPrecisionReferenceEngine(model), onnx })
            foreach (var (d, t) in new[] { (3, 8), (4, 6) })
            {
                int[] prompt = [1];
                var expected = TargetOnlyGreedy(engine, t, prompt, 200);
                foreach (int k in new[] { 1, 4, 8 })
                {
                    var (actual, generator) = Speculative(engine, prompt, new GenerationOptions { DraftBits = d, DraftTokens = k }, t, 200);
                    CollectionAssert.AreEqual(expected, actual, $"{engine.GetType().Name} d={d} t={t} k={k}");
                    if (k > 1) Assert.IsLessThan(generator.Stats.Drafted, generator.Stats.Accepted, "some drafts were rejected");
                }
            }
    }

    [TestMethod]
    public void AfterRollbacksBothCachesAreIdenticalToPlainRunsOverTheSameAcceptedPrefix() =>
        AssertCachesAreThoseOfPlainRuns(_engine, Prompt("The cat sat"), targetBits: 8, draftBits: 3);

    /// <summary>
    /// The same over a prompt of more than <see cref="Kernels.CausalAttention.BlockedTokens"/> tokens on 16-wide heads,
    /// whose prefill takes the blocked products. (This does not catch a verification pass attending in another order than
    /// decode steps: the int8 activations mostly absorb such differences before they reach the cache. The kernel-level
    /// CausalAttentionTests.AVerificationPassGivesEachTokenExactlyWhatItsDecodeStepGives does.)
    /// </summary>
    [TestMethod]
    public void AfterALongPromptBothCachesAreIdenticalToPlainRuns()
    {
        using var model = SyntheticGqaModel("long-prompt");
        using var onnx = new OnnxEngine(model);
        int[] prompt = [1, .. Enumerable.Range(0, 79).Select(i => (i * 53 + 7) % 96)];
        Assert.IsGreaterThanOrEqualTo(Kernels.CausalAttention.BlockedTokens, prompt.Length - 1, "the prompt takes the blocked products");
        AssertCachesAreThoseOfPlainRuns(onnx, prompt, targetBits: 8, draftBits: 3);
    }

    /// <summary>
    /// Target-only decoding feeds a prompt as speculative decoding does: all but its last token in one call, then the
    /// last as a decode step (a prompt of CausalAttention.BlockedTokens or more would otherwise attend its last token in
    /// the blocked products, in another order than the first verification pass does).
    /// </summary>
    [TestMethod]
    public void TargetOnlyDecodingFeedsThePromptsLastTokenAsADecodeStep()
    {
        var recorder = new RecordingEngine(_engine);
        string text = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends.";
        int promptTokens = Prompt(text).Length;
        var result = new TextGenerator(recorder, _tok).Generate(text, new GenerationOptions { MaxTokens = 3, Temperature = 0 });
        Assert.AreEqual(promptTokens, result.PromptTokens);
        CollectionAssert.AreEqual(new[] { promptTokens - 1, 1, 1, 1 }, recorder.Calls.Take(4).ToArray(), "prompt but its last token, the last token, then one per generated token");
    }

    /// <summary>An engine that records how many tokens each forward call ran, and runs them on a real engine.</summary>
    private sealed class RecordingEngine(IInferenceEngine inner) : IInferenceEngine
    {
        public List<int> Calls { get; } = [];
        public LlamaConfig Config => inner.Config;
        public KvCache CreateCache(int capacity = 0) => inner.CreateCache(capacity);
        public void Forward(ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits) { Calls.Add(tokens.Length); inner.Forward(tokens, cache, logits); }
        public void Dispose() { }
    }

    /// <summary>
    /// A model with random weights (so draft and target disagree often: many rollbacks), 8 query heads over 2 KV heads
    /// 16 wide, 256 positions, quantized into <paramref name="name"/>-ap.
    /// </summary>
    private static AnyPrecisionModel SyntheticGqaModel(string name)
    {
        var c = TestData.TinyConfig() with { Dim = 128, HiddenDim = 192, Heads = 8, KvHeads = 2, HeadDim = 16, VocabSize = 96, MaxSeqLen = 256 };
        SyntheticModel.Write(c, _dir[$"{name}-hf"], DType.F32);
        using (var source = LlamaCheckpoint.Open(_dir[$"{name}-hf"]))
            AnyPrecisionQuantizer.Quantize(source, _dir[$"{name}-ap"], new UniformSensitivity(), new QuantizerOptions());
        return AnyPrecisionModel.Open(_dir[$"{name}-ap"]);
    }

    /// <summary>
    /// 120 tokens of greedy speculative decoding with k = 8 (many rollbacks), then both caches against plain runs: the first
    /// `prefill` tokens in one call, then one decode step per token. The target cache holds the committed tokens but the
    /// last, its prompt fed as target-only decoding feeds it (all but the last token in one call, the last as a step); the
    /// draft's first call fed the whole prompt.
    /// </summary>
    private static void AssertCachesAreThoseOfPlainRuns(IAnyPrecisionEngine engine, int[] prompt, int targetBits, int draftBits)
    {
        var options = new GenerationOptions { DraftBits = draftBits, DraftTokens = 8 };
        int capacity = prompt.Length + 160;
        var generator = new SpeculativeGenerator(engine, prompt, options, new Sampler(options), targetBits, capacity: capacity);
        while (generator.Tokens.Count < prompt.Length + 120) generator.NextRound();
        Assert.IsLessThan(generator.Stats.Drafted, generator.Stats.Accepted, "the run must have rolled back rejected drafts");
        var committed = generator.Tokens.ToArray();
        void AssertSameAsPlain(KvCache actual, int bits, int prefill, int length, string what)
        {
            var plain = engine.CreateCache(capacity);
            var logits = new float[engine.Config.VocabSize];
            engine.Forward(committed.AsSpan(0, prefill), plain, logits, bits);
            for (int p = prefill; p < length; p++) engine.Forward(committed.AsSpan(p, 1), plain, logits, bits);
            Assert.AreEqual(length, actual.Length, what);
            for (int i = 0; i < plain.Buffers.Count; i++)
                CollectionAssert.AreEqual(plain.Buffers[i], actual.Buffers[i], $"{what}: buffer {i} (whole capacity, rolled-back positions zero)");
        }
        AssertSameAsPlain(generator.TargetCache, targetBits, prompt.Length - 1, committed.Length - 1, "target");
        Assert.IsGreaterThanOrEqualTo(prompt.Length, generator.DraftCache.Length);
        AssertSameAsPlain(generator.DraftCache, draftBits, prompt.Length, generator.DraftCache.Length, "draft");
    }

    [TestMethod]
    [DataRow(KvCacheType.BFloat16)]
    [DataRow(KvCacheType.Float32)]
    public void TruncateRestoresTheOnnxCacheExactlyAndDecodingContinuesAsIfTheRejectedTokensNeverRan(KvCacheType type)
    {
        using var onnx = new OnnxEngine(_model, new OnnxEngineOptions { Bits = 6, KvCacheType = type });
        int[] a = [1, 403, 407, 261, 378], rejected = [324, 261, 264, 416, 319], c = [267, 417, 265];
        int vocab = _model.Config.VocabSize;
        var cache = onnx.CreateCache(32);
        var logits = new float[vocab];
        onnx.Forward(a, cache, logits);
        var before = cache.Buffers.Select(b => b.ToArray()).ToList();
        onnx.Forward(rejected, cache, new float[rejected.Length * vocab], 8);
        cache.Truncate(a.Length);
        Assert.AreEqual(a.Length, cache.Length);
        for (int i = 0; i < before.Count; i++) CollectionAssert.AreEqual(before[i], cache.Buffers[i], $"buffer {i}");

        var fresh = onnx.CreateCache(32);
        onnx.Forward(a, fresh, logits);
        var expected = new float[c.Length * vocab];
        var actual = new float[c.Length * vocab];
        onnx.Forward(c, fresh, expected);
        onnx.Forward(c, cache, actual);
        CollectionAssert.AreEqual(expected, actual);
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => cache.Truncate(cache.Length + 1));
    }

    /// <summary>Pearson's statistic of <paramref name="counts"/> against <paramref name="expected"/> probabilities, cells under 5 expected pooled; and its degrees of freedom.</summary>
    private static (double Statistic, int Df) ChiSquare(long[] counts, double[] expected)
    {
        long n = counts.Sum();
        double stat = 0, pooledE = 0, pooledO = 0;
        int cells = 0;
        for (int i = 0; i < counts.Length; i++)
        {
            double e = expected[i] * n;
            if (e < 5) { pooledE += e; pooledO += counts[i]; continue; }
            stat += (counts[i] - e) * (counts[i] - e) / e;
            cells++;
        }
        if (pooledE > 0)
        {
            stat += (pooledO - pooledE) * (pooledO - pooledE) / Math.Max(pooledE, 1e-9);
            cells++;
        }
        return (stat, cells - 1);
    }

    /// <summary>The chi-square quantile at 1 − 0.001 (Wilson–Hilferty), the test's critical value.</summary>
    private static double Critical(int df)
    {
        const double Z = 3.0902; // standard normal at 0.999
        double h = 2.0 / (9 * df);
        return df * Math.Pow(1 - h + Z * Math.Sqrt(h), 3);
    }

    [TestMethod]
    public void TheVerifyRuleReproducesTheTargetDistributionAndTheSameTestCatchesWrongRules()
    {
        float[] draft = [0.40f, 0.25f, 0.15f, 0.10f, 0.05f, 0.05f];
        float[] target = [0.10f, 0.20f, 0.30f, 0.05f, 0.30f, 0.05f];
        var sampler = new Sampler(new GenerationOptions { Temperature = 1, Seed = 7 });
        var residual = new float[draft.Length];
        const int N = 40000;
        long[] Histogram(Func<int, int> rule)
        {
            var counts = new long[draft.Length];
            for (int i = 0; i < N; i++) counts[rule(sampler.Draw(draft))]++;
            return counts;
        }
        var p = target.Select(x => (double)x).ToArray();

        var (right, df) = ChiSquare(Histogram(x => sampler.Verify(draft, target, x, residual).Token), p);
        Assert.AreEqual(5, df);
        Assert.IsLessThan(Critical(df), right, "the accept/reject rule must give the target's distribution");

        // Wrong: on rejection, draw from the target instead of the residual max(0, target − draft).
        var (fromTarget, _) = ChiSquare(Histogram(x => sampler.NextFloat() * draft[x] < target[x] ? x : sampler.Draw(target)), p);
        Assert.IsGreaterThan(Critical(df), fromTarget);
        // Wrong: accept with probability target[x] instead of the ratio target[x] / draft[x].
        var (byTarget, _) = ChiSquare(Histogram(x =>
        {
            if (sampler.NextFloat() < target[x]) return x;
            TensorPrimitives.Subtract(target, draft, residual);
            TensorPrimitives.Max(residual, 0f, residual);
            return sampler.Draw(residual);
        }), p);
        Assert.IsGreaterThan(Critical(df), byTarget);
    }

    [TestMethod]
    public void SpeculativeSamplingDrawsTheFirstTwoTokensFromTheTargetsDistributions()
    {
        // A tiny effective vocabulary: top-k 6 of the model's 512, temperature and top-p on both widths alike.
        int[] prompt = Prompt("She saw a");
        var shaping = new GenerationOptions { Temperature = 1.2f, TopK = 6, TopP = 0.97f };
        int vocab = _model.Config.VocabSize, target = 8;
        var shaper = new Sampler(shaping with { Seed = 1 });
        double[] Next(int[] tokens)
        {
            var logits = new float[vocab];
            _engine.Forward(tokens, _engine.CreateCache(), logits, target);
            var probs = new float[vocab];
            shaper.Distribution(logits, probs);
            return probs.Select(x => (double)x).ToArray();
        }
        var first = Next(prompt);
        var second = new double[vocab];
        for (int x = 0; x < vocab; x++)
            if (first[x] > 0)
            {
                var next = Next([.. prompt, x]);
                for (int y = 0; y < vocab; y++) second[y] += first[x] * next[y];
            }

        var seeds = new Random(12345);
        foreach (int k in new[] { 1, 3 })
        {
            const int N = 20000;
            var c1 = new long[vocab];
            var c2 = new long[vocab];
            long drafted = 0, accepted = 0;
            for (int i = 0; i < N; i++)
            {
                var options = shaping with { Seed = (ulong)seeds.NextInt64(1, long.MaxValue), DraftBits = 3, DraftTokens = k };
                var (tokens, generator) = Speculative(_engine, prompt, options, target, 2);
                c1[tokens[0]]++;
                c2[tokens[1]]++;
                drafted += generator.Stats.Drafted;
                accepted += generator.Stats.Accepted;
            }
            var (s1, df1) = ChiSquare(c1, first);
            var (s2, df2) = ChiSquare(c2, second);
            Assert.AreEqual(5, df1, "six tokens in the first token's support");
            Assert.IsGreaterThanOrEqualTo(15, df2);
            Assert.IsLessThan(Critical(df1), s1, $"k={k}: first token");
            Assert.IsLessThan(Critical(df2), s2, $"k={k}: second token");
            // The test is only worth something when the draft differs from the target: some drafts must be rejected.
            Assert.IsLessThan(0.8, accepted / (double)drafted, $"k={k}: acceptance");
        }
    }

    [TestMethod]
    public void GenerateWithADraftWidthPrintsTheTargetOnlyTextAndTheCounts()
    {
        string[] common = ["generate", "--model", _dir["ap"], "--engine", "reference", "--bits", "8", "--prompt", "Once upon a time", "--max-tokens", "40", "--json"];
        var (code, output, err) = Cli.Run(common);
        Assert.AreEqual(0, code, err);
        using var plain = JsonDocument.Parse(output);
        (code, output, err) = Cli.Run([.. common, "--draft-bits", "3", "--draft-tokens", "4"]);
        Assert.AreEqual(0, code, err);
        using var speculative = JsonDocument.Parse(output);
        Assert.AreEqual(plain.RootElement.GetProperty("text").GetString(), speculative.RootElement.GetProperty("text").GetString());
        var s = speculative.RootElement.GetProperty("speculative");
        Assert.AreEqual(3, s.GetProperty("draft_bits").GetInt32());
        Assert.AreEqual(8, s.GetProperty("target_bits").GetInt32());
        long drafted = s.GetProperty("drafted").GetInt64(), accepted = s.GetProperty("accepted").GetInt64(), steps = s.GetProperty("target_steps").GetInt64();
        Assert.AreEqual(4 * steps, drafted);
        Assert.IsInRange(40L, 44L, accepted + steps);
        Assert.AreEqual(JsonValueKind.Null, plain.RootElement.GetProperty("speculative").ValueKind);

        (code, _, err) = Cli.Run([.. common, "--draft-bits", "8"]);
        Assert.AreEqual(2, code, "bad input exits 2");
        Assert.StartsWith("error: --draft-bits 8 must be in 3..7", err.Trim().Split('\n')[^1]);
        (code, _, err) = Cli.Run("generate", "--model", TestData.Stories260K, "--draft-bits", "3");
        Assert.AreEqual(2, code, "bad input exits 2");
        StringAssert.Contains(err, "--draft-bits applies to any-precision models");
    }

    [TestMethod]
    public void BenchSpeculativeReportsEveryConfigurationAndTheBestPerTarget()
    {
        var (code, output, err) = Cli.Run("bench", "speculative", "-m", _dir["ap"], "--engine", "reference", "--prompts", "2", "--tokens", "24",
            "--targets", "6", "8", "--drafts", "3", "4", "--draft-tokens", "1", "4", "--acceptance", "3=0.5", "--json");
        Assert.AreEqual(0, code, err);
        using var doc = JsonDocument.Parse(output);
        var rows = doc.RootElement.GetProperty("rows").EnumerateArray().ToList();
        Assert.HasCount(2 * 2 * 2, rows);
        foreach (var row in rows)
        {
            Assert.IsTrue(row.GetProperty("same_output").GetBoolean(), "greedy output unchanged");
            Assert.IsInRange(0.0, 1.0, row.GetProperty("acceptance_rate").GetDouble());
            Assert.IsInRange(1.0, 1.0 + row.GetProperty("draft_tokens").GetInt32(), row.GetProperty("tokens_per_target_step").GetDouble());
        }
        CollectionAssert.AreEqual(new[] { 6, 8 }, doc.RootElement.GetProperty("best").EnumerateArray().Select(b => b.GetProperty("target_bits").GetInt32()).ToArray());
        // The kernels that ran are named (here the reference engine's fp32), in the JSON and on stderr.
        Assert.AreEqual("managed fp32 on dequantized weights", doc.RootElement.GetProperty("kernels").GetString());
        StringAssert.Contains(err, "engine: reference");

        // The cost model: a round of k drafts kept with chance 1/2 yields 1 + 1/2 + ... + 1/2^k tokens, at k draft passes and one verify pass.
        var model = doc.RootElement.GetProperty("model_rows").EnumerateArray().ToList();
        Assert.HasCount(2 * 2, model);
        foreach (var row in model)
        {
            int k = row.GetProperty("draft_tokens").GetInt32();
            double perRound = 2 - Math.Pow(0.5, k);
            Assert.AreEqual(perRound, row.GetProperty("tokens_per_round").GetDouble(), 1e-3);
            double expected = 1000 * perRound / (k * row.GetProperty("draft_ms").GetDouble() + row.GetProperty("verify_ms").GetDouble());
            Assert.AreEqual(expected, row.GetProperty("tokens_per_second").GetDouble(), expected * 0.01 + 0.01);
        }
        var (bad, _, badErr) = Cli.Run("bench", "speculative", "-m", _dir["ap"], "--engine", "reference", "--acceptance", "3=1.5");
        Assert.AreEqual(2, bad, "bad input exits 2");
        StringAssert.Contains(badErr, "--acceptance '3=1.5'");
    }

    [TestMethod]
    public void BadSpeculativeSettingsAreRejected()
    {
        int[] prompt = [1];
        var sampler = new Sampler(new GenerationOptions());
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => new SpeculativeGenerator(_engine, prompt, new GenerationOptions { DraftBits = 8 }, sampler, 8));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => new SpeculativeGenerator(_engine, prompt, new GenerationOptions { DraftBits = 2 }, sampler, 8));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => new GenerationOptions { DraftTokens = 0 }.Validated());
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => new GenerationOptions { DraftThreshold = 1 }.Validated());
        using var checkpoint = LlamaCheckpoint.Open(TestData.Stories260K);
        var plain = new TextGenerator(ReferenceEngine.FromCheckpoint(checkpoint), _tok);
        var e = Assert.ThrowsExactly<ArgumentException>(() => plain.Generate("x", new GenerationOptions { DraftBits = 3 }));
        StringAssert.Contains(e.Message, "any-precision");
    }
}
