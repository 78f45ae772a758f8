using System.Text.Json;
using AnyPrecML.Evaluation;
using AnyPrecML.Kernels;
using AnyPrecML.Models;
using AnyPrecML.Onnx;
using AnyPrecML.Quantization;
using AnyPrecML.Tokenization;

namespace AnyPrecML.Tests;

[TestClass]
public sealed class PrecisionProfileTests
{
    private static TestData.TempDir _dir = null!;
    private static AnyPrecisionModel _model = null!;
    private static readonly int[] Prompt = [1, 403, 407, 261, 378, 324, 261, 264, 416, 319, 267, 417, 265, 400, 410, 269];

    [ClassInitialize]
    public static void QuantizeOnce(TestContext _)
    {
        _dir = TestData.NewTempDir();
        TestData.QuantizeStories260K(_dir["ap"], new QuantizerOptions { SeedBits = 3, ParentBits = 5 });
        _model = AnyPrecisionModel.Open(_dir["ap"]);
    }

    [ClassCleanup]
    public static void Cleanup()
    {
        _model.Dispose();
        _dir.Dispose();
    }

    private static int[] RandomWidths(int seed)
    {
        var rng = new Random(seed);
        return Enumerable.Range(0, _model.LinearCount).Select(_ => rng.Next(_model.SeedBits, _model.ParentBits + 1)).ToArray();
    }

    [TestMethod]
    public void OnnxEngineRunsEveryLinearAtItsOwnWidthAsTheReferenceDoes()
    {
        using var onnx = new OnnxEngine(_model, new OnnxEngineOptions { Backend = new CpuBitplaneBackend(accuracy: KernelAccuracy.Float32), KvCacheType = KvCacheType.Float32 });
        var reference = new AnyPrecisionReferenceEngine(_model);
        float[] Logits(IAnyPrecisionEngine e, IReadOnlyList<int> widths) => TestData.AllLogits(new ProfiledEngine(e, new PrecisionProfile(_model, widths)), Prompt);

        var widths = RandomWidths(7);
        Assert.IsGreaterThan(1, widths.Distinct().Count());
        var expected = Logits(reference, widths); // each linear dequantized at its own width, the fp32 forward pass
        double scale = expected.Max(Math.Abs);
        Assert.IsLessThan(1e-4, TestData.MaxAbsDiff(Logits(onnx, widths), expected) / scale, "ONNX at the profile = reference at the profile");
        foreach (int b in _model.SupportedBits)
        {
            Assert.IsGreaterThan(1e-3, TestData.MaxAbsDiff(TestData.AllLogits(new FixedBits(reference, b), Prompt), expected) / scale, $"the profile is not uniform {b} bits");
            CollectionAssert.AreEqual(TestData.AllLogits(new FixedBits(onnx, b), Prompt), Logits(onnx, PrecisionProfile.Uniform(_model, b).Widths), $"a uniform profile is the width {b}");
        }
        // One linear raised alone moves the output: the operator reads its own entry, by the model's linear order.
        var one = Enumerable.Repeat(3, _model.LinearCount).ToArray();
        one[_model.LinearIndex("model.layers.2.mlp.down_proj")] = 5;
        Assert.IsLessThan(1e-4, TestData.MaxAbsDiff(Logits(onnx, one), Logits(reference, one)) / scale);

        StringAssert.Contains(Assert.ThrowsExactly<ArgumentException>(() => onnx.Forward(Prompt, onnx.CreateCache(), new float[Prompt.Length * 512], [3, 4])).Message, "35 linears");
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => onnx.Forward(Prompt, onnx.CreateCache(), new float[Prompt.Length * 512], Enumerable.Repeat(6, 35).ToArray()));
    }

    [TestMethod]
    public void ProfileFilesRoundTripAndRefuseAnotherModelsProfile()
    {
        var profile = new PrecisionProfile(_model, RandomWidths(3)) { TargetBits = 4 };
        string path = _dir["p.json"];
        profile.Save(_model, path);
        Assert.IsFalse(File.Exists(path + ".tmp"));
        var loaded = PrecisionProfile.Load(_model, path);
        CollectionAssert.AreEqual(profile.Widths.ToArray(), loaded.Widths.ToArray());
        Assert.AreEqual(profile.AverageBits, loaded.AverageBits, 1e-12);
        // The average counts each linear by its weights: brute force over the shapes.
        double bits = 0, weights = 0;
        for (int i = 0; i < _model.LinearCount; i++) { bits += (double)_model.Linear(i).Rows * _model.Linear(i).Cols * profile.Widths[i]; weights += (double)_model.Linear(i).Rows * _model.Linear(i).Cols; }
        Assert.AreEqual(bits / weights, profile.AverageBits, 1e-12);

        var json = JsonDocument.Parse(File.ReadAllText(path)).RootElement;
        File.WriteAllText(_dir["other.json"], File.ReadAllText(path).Replace("model.layers.4.", "model.layers.9.", StringComparison.Ordinal));
        StringAssert.Contains(Assert.ThrowsExactly<ModelFormatException>(() => PrecisionProfile.Load(_model, _dir["other.json"])).Message, "made for another model");
        File.WriteAllText(_dir["wide.json"], File.ReadAllText(path).Replace($"\"model.layers.0.self_attn.q_proj\": {json.GetProperty("widths").GetProperty("model.layers.0.self_attn.q_proj").GetInt32()}", "\"model.layers.0.self_attn.q_proj\": 8", StringComparison.Ordinal));
        StringAssert.Contains(Assert.ThrowsExactly<ModelFormatException>(() => PrecisionProfile.Load(_model, _dir["wide.json"])).Message, "outside this model's 3..5");
    }

    [TestMethod]
    public void ChosenProfileBeatsARandomOneOfTheSameBudgetOnHeldOutText()
    {
        var lines = File.ReadAllLines(TestData.TinyStories);
        var tokenizer = LlamaTokenizerLoader.Load(_model.Checkpoint);
        var calibration = PerplexityEvaluator.Documents(tokenizer, string.Join('\n', lines[..9]), 64);
        var heldOut = PerplexityEvaluator.Documents(tokenizer, string.Join('\n', lines[10..19]), 256);
        using var engine = new OnnxEngine(_model);
        double Ppl(PrecisionProfile p) => PerplexityEvaluator.EvaluateSequences(new ProfiledEngine(engine, p), heldOut).Perplexity;

        var chosen = PrecisionProfileSearch.Choose(_model, engine, calibration, 3.5);
        var random = PrecisionProfileSearch.Random(_model, 3.5, seed: 1);
        long largest = Enumerable.Range(0, _model.LinearCount).Max(i => (long)_model.Linear(i).Rows * _model.Linear(i).Cols);
        double total = Enumerable.Range(0, _model.LinearCount).Sum(i => (double)_model.Linear(i).Rows * _model.Linear(i).Cols);
        foreach (var p in new[] { chosen, random })
        {
            Assert.IsLessThanOrEqualTo(3.5, p.AverageBits, "within the budget");
            Assert.IsGreaterThan(3.5 - largest / total, p.AverageBits, "filled until no linear fits");
        }
        double c = Ppl(chosen), r = Ppl(random), three = Ppl(PrecisionProfile.Uniform(_model, 3)), four = Ppl(PrecisionProfile.Uniform(_model, 4));
        Console.WriteLine($"held-out perplexity: uniform 3 {three:F3}, random 3.5 {r:F3} ({random.AverageBits:F3}), chosen 3.5 {c:F3} ({chosen.AverageBits:F3}), uniform 4 {four:F3}");
        Assert.IsLessThan(r, c, "the chosen profile beats the random one");
        Assert.IsLessThan(three, c);
        Assert.IsGreaterThan(four, c);

        // The search's measure: KL(parent ‖ profile) ≥ 0, falling as bits are added, and 0 for the parent itself.
        double klStart = (double)chosen.Provenance!["kl_from_parent_start"]!, klEnd = (double)chosen.Provenance["kl_from_parent"]!;
        Assert.IsGreaterThan(klEnd, klStart, "raising linears brings the model closer to the parent");
        Assert.IsGreaterThan(0.0, klEnd);
        var whole = PrecisionProfileSearch.Choose(_model, engine, calibration, _model.ParentBits);
        Assert.AreEqual(0.0, (double)whole.Provenance!["kl_from_parent"]!, 1e-5, "the parent diverges from itself by nothing");
    }

    [TestMethod]
    public void CliTakesFractionalBitsAndProfileFilesAndSaysWhichRan()
    {
        string ap = _dir["ap"];
        var (code, output, err) = Cli.Run("profile", "--model", ap, "--bits", "4.25", "--random", "5", "--json");
        Assert.AreEqual(0, code, err);
        string saved = Path.Combine(ap, "profile-4.25bit.json");
        Assert.AreEqual(Path.GetFullPath(saved), JsonDocument.Parse(output).RootElement.GetProperty("output").GetString());
        var widths = PrecisionProfile.Load(_model, saved).Widths;

        JsonElement Perplexity(params string[] extra)
        {
            var (c, o, e) = Cli.Run(["perplexity", "--model", ap, "--text", TestData.TinyStories, "--bos-per-line", "--truncate", "32", "--json", .. extra]);
            Assert.AreEqual(0, c, e);
            return JsonDocument.Parse(o).RootElement.Clone();
        }
        var byBits = Perplexity("--bits", "4.25");
        var byFile = Perplexity("--profile", saved);
        CollectionAssert.AreEqual(widths.ToArray(), byBits.GetProperty("widths").GetProperty("profile").EnumerateArray().Select(e => e.GetInt32()).ToArray());
        Assert.AreEqual(byFile.GetProperty("nll").GetDouble(), byBits.GetProperty("nll").GetDouble());
        double four = Perplexity("--bits", "4").GetProperty("nll").GetDouble(), five = Perplexity("--bits", "5").GetProperty("nll").GetDouble();
        Assert.AreNotEqual(four, byBits.GetProperty("nll").GetDouble());
        Assert.AreNotEqual(five, byBits.GetProperty("nll").GetDouble());

        (code, _, err) = Cli.Run("perplexity", "--model", ap, "--text", TestData.TinyStories, "--bits", "3.75");
        Assert.AreEqual(2, code);
        StringAssert.Contains(err, "error: --bits 3.75: no precision profile for that average beside the model");
        StringAssert.Contains(err, "anyprec profile --model");
        (code, _, err) = Cli.Run("generate", "--model", ap, "--bits", "4.25", "--draft-bits", "3", "--max-tokens", "4");
        Assert.AreEqual(2, code);
        StringAssert.Contains(err, "error: --draft-bits drafts and verifies at whole widths");
        (code, _, err) = Cli.Run("generate", "--model", ap, "--bits", "4.25", "--speculate", "--max-tokens", "4");
        Assert.AreEqual(2, code);
        StringAssert.Contains(err, "error: --speculate drafts and verifies at whole widths");
        (code, _, err) = Cli.Run("generate", "--model", ap, "--bits", "4", "--profile", saved, "--max-tokens", "4");
        Assert.AreEqual(2, code);
        StringAssert.Contains(err, "error: --bits and --profile both choose the widths; give one.");
        (code, _, err) = Cli.Run("generate", "--model", ap, "--profile", saved, "--max-tokens", "4");
        Assert.AreEqual(0, code, err);
        StringAssert.Contains(err, "engine: onnx, profile 4.25 bits");
    }

    /// <summary>An engine pinned to width <paramref name="bits"/> (the uniform model to compare with).</summary>
    private sealed class FixedBits(IAnyPrecisionEngine engine, int bits) : IInferenceEngine
    {
        public LlamaConfig Config => engine.Config;
        public KvCache CreateCache(int capacity = 0) => engine.CreateCache(capacity);
        public void Forward(ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits) => engine.Forward(tokens, cache, logits, bits);
        public void Dispose() { }
    }
}
