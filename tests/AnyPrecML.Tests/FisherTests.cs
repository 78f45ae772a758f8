using AnyPrecML.Evaluation;
using AnyPrecML.Models;
using AnyPrecML.Quantization;
using AnyPrecML.Reference;
using AnyPrecML.Tokenization;

namespace AnyPrecML.Tests;

[TestClass]
public sealed class FisherTests
{
    public static IEnumerable<object[]> Models =>
    [
        [false, RopeLayout.HalfSplit, 4, 2],  // GQA, untied head
        [true, RopeLayout.Interleaved, 4, 1], // MQA, tied head, llama2.c pairing
        [true, RopeLayout.HalfSplit, 2, 2],   // MHA, tied
    ];

    [TestMethod]
    [DynamicData(nameof(Models))]
    public void GradientsMatchCentralFiniteDifferencesInFloat64(bool tied, RopeLayout rope, int heads, int kvHeads)
    {
        var config = new LlamaConfig
        {
            Dim = 16, HiddenDim = 24, Layers = 2, Heads = heads, KvHeads = kvHeads, HeadDim = 16 / heads, VocabSize = 11, MaxSeqLen = 16,
            RmsNormEps = 1e-5f, RopeTheta = 10000f, RopeLayout = rope, TiedEmbeddings = tied,
        };
        var pass = new LlamaBackward<double>(TestData.RandomWeights(config, seed: 17));
        int[] tokens = [1, 4, 9, 2, 10, 3, 3, 7];
        var analytic = new Dictionary<(int, string), double[]>();
        pass.Gradients(tokens, (l, part, g) => analytic[(l, part)] = (double[])g.Clone());
        Assert.HasCount(2 * 7, analytic);

        var rng = new Random(5);
        const double h = 1e-5;
        foreach (var ((layer, part), grad) in analytic)
        {
            var w = pass.Weight(layer, part);
            double diff = 0, norm = 0;
            for (int k = 0; k < 12; k++)
            {
                int i = rng.Next(w.Length);
                double saved = w[i];
                w[i] = saved + h; double plus = pass.Loss(tokens);
                w[i] = saved - h; double minus = pass.Loss(tokens);
                w[i] = saved;
                double fd = (plus - minus) / (2 * h);
                diff += (grad[i] - fd) * (grad[i] - fd);
                norm += fd * fd;
                Assert.AreEqual(fd, grad[i], 1e-4 * Math.Max(Math.Abs(fd), 1e-3), $"layer {layer} {part}[{i}]");
            }
            Assert.IsLessThan(1e-4, Math.Sqrt(diff / Math.Max(norm, 1e-30)), $"layer {layer} {part}: relative error");
        }
    }

    [TestMethod]
    public void FloatLossEqualsTheReferenceEngineNll()
    {
        var w = TestData.RandomWeights(TestData.TinyConfig(), seed: 8);
        int[] tokens = [1, 5, 9, 36, 0, 2, 17, 17, 4, 30];
        float loss = new LlamaBackward<float>(w).Loss(tokens);
        var ppl = PerplexityEvaluator.Evaluate(new ReferenceEngine(w), tokens, contextLength: tokens.Length);
        Assert.AreEqual(ppl.Nll, loss, 1e-4);
    }

    [TestMethod]
    public void FisherOnStories260KIsPositiveAndQuantizesIntoAWorkingModel()
    {
        using var source = LlamaCheckpoint.Open(TestData.Stories260K);
        var tok = LlamaTokenizerLoader.Load(source);
        var calibration = CalibrationSet.FromText(tok, string.Join('\n', File.ReadLines(TestData.TinyStories).Take(3)), samples: 2, sequenceLength: 128, 512, "two stories");
        var (sens, summary) = SensitivitySources.Create("fisher", ReferenceEngine.FromCheckpoint(source), calibration);
        Assert.AreEqual("fisher", sens.Kind);
        Assert.AreEqual(2, summary!["samples"]!.GetValue<int>());
        Assert.AreEqual(256, summary!["tokens"]!.GetValue<long>(), "two documents, each cut to its first 128 tokens");
        var s = sens.For(0, "mlp.down_proj", 64, 172);
        Assert.IsFalse(s.PerColumn);
        Assert.IsTrue(s.Row(3).ToArray().All(v => v >= 0 && float.IsFinite(v)));
        Assert.IsGreaterThan(0f, s.Row(3).ToArray().Max());
        Assert.AreEqual(1.4, ((FisherSensitivity)sens).MeanLoss, 0.4, "the calibration loss of a trained model on the openings of in-domain stories");

        using var dir = TestData.NewTempDir();
        AnyPrecisionQuantizer.Quantize(source, dir["ap"], sens, new QuantizerOptions(), summary);
        using var ap = AnyPrecisionModel.Open(dir["ap"]);
        Assert.AreEqual("fisher", ap.SensitivityKind);
        var tokens = PerplexityEvaluator.Tokenize(tok, File.ReadLines(TestData.TinyStories).Skip(12).First(), bosPerLine: true);
        double fp32 = PerplexityEvaluator.Evaluate(ReferenceEngine.FromCheckpoint(source), tokens).Perplexity;
        double at8 = PerplexityEvaluator.Evaluate(new ReferenceEngine(ap.ToWeights(8)), tokens).Perplexity;
        Assert.AreEqual(fp32, at8, fp32 * 0.005);
    }
}
