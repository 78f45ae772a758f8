using System.Text.Json;
using AnyPrecML.Generation;
using AnyPrecML.Quantization;
using AnyPrecML.Reference;
using AnyPrecML.Tokenization;

namespace AnyPrecML.Tests;

[TestClass]
public sealed class QuantizeCliTests
{
    private static (int Code, string Out, string Err) Run(params string[] args) => Cli.Run(args);

    [TestMethod]
    public void QuantizeThenEvalAndGenerateAtEveryWidth()
    {
        using var dir = TestData.NewTempDir();
        File.WriteAllLines(dir["calib.txt"], File.ReadLines(TestData.TinyStories).Take(3));
        File.WriteAllLines(dir["eval.txt"], File.ReadLines(TestData.TinyStories).Skip(10).Take(1));
        var (code, output, err) = Run("quantize", "--model", TestData.Stories260K, "--calibration", dir["calib.txt"], "--seed-bits", "3", "--parent-bits", "6", "--output", dir["ap"], "--json");
        Assert.AreEqual(0, code, err);
        StringAssert.Contains(err, "quantize: 35/35", "progress is reported");
        using (var doc = JsonDocument.Parse(output))
        {
            Assert.AreEqual("hessian", doc.RootElement.GetProperty("sensitivity").GetString());
            Assert.AreEqual(6, doc.RootElement.GetProperty("parent_bits").GetInt32());
        }

        (code, output, err) = Run("eval", "--model", dir["ap"], "--original", TestData.Stories260K, "--text", dir["eval.txt"], "--bos-per-line", "--json", "--csv", dir["ppl.csv"], "--plot", dir["ppl.png"]);
        Assert.AreEqual(0, code, err);
        using (var doc = JsonDocument.Parse(output))
        {
            var rows = doc.RootElement.GetProperty("rows").EnumerateArray().ToList();
            CollectionAssert.AreEqual(new[] { 3, 4, 5, 6 }, rows.Select(r => r.GetProperty("bits").GetInt32()).ToArray());
            Assert.IsFalse(rows[0].TryGetProperty("independent", out _), "baselines only with --baselines");
            Assert.IsGreaterThan(doc.RootElement.GetProperty("fp32").GetDouble(), rows[0].GetProperty("anyprecision").GetDouble());
        }
        Assert.HasCount(5, File.ReadAllLines(dir["ppl.csv"]));
        Assert.IsGreaterThan(10_000L, new FileInfo(dir["ppl.png"]).Length);

        // generate --bits b on the directory equals the reference engine on that width's dequantized weights.
        using var ap = AnyPrecisionModel.Open(dir["ap"]);
        var generator = new TextGenerator(new ReferenceEngine(ap.ToWeights(4)), LlamaTokenizerLoader.Load(ap.Checkpoint));
        string expected = generator.Generate("Once upon", new GenerationOptions { MaxTokens = 20 }).Text;
        (code, output, err) = Run("generate", "--model", dir["ap"], "--bits", "4", "--prompt", "Once upon", "--max-tokens", "20", "--json");
        Assert.AreEqual(0, code, err);
        using (var doc = JsonDocument.Parse(output)) Assert.AreEqual(expected, doc.RootElement.GetProperty("text").GetString());

        (code, _, err) = Run("generate", "--model", dir["ap"], "--bits", "7");
        Assert.AreEqual(2, code);
        StringAssert.Contains(err, "3..6");
    }

    [TestMethod]
    public void QuantizeNeedsCalibrationForHessianAndValidBits()
    {
        using var dir = TestData.NewTempDir();
        var (code, _, err) = Run("quantize", "--model", TestData.Stories260K, "--output", dir["x"]);
        Assert.AreEqual(2, code);
        StringAssert.Contains(err, "--calibration");
        (code, _, err) = Run("quantize", "--model", TestData.Stories260K, "--sensitivity", "uniform", "--parent-bits", "9", "--output", dir["x"]);
        Assert.AreEqual(2, code);
        StringAssert.Contains(err, "parent bits");
        Assert.IsFalse(Directory.Exists(dir["x"]), "nothing is written on error");
    }

    [TestMethod]
    public void MemoryBenchComesFromTheFormat()
    {
        var (code, output, err) = Run("bench", "memory", "--shape", "llama2-7b", "--json");
        Assert.AreEqual(0, code, err);
        using var doc = JsonDocument.Parse(output);
        // q_proj of Llama-2-7B: 4096 rows × 128 words × 4 bytes × 8 planes + 4096 × (8+16+...+256) × 2 bytes, each plane
        // padded by 4 rows: its 2 MB would put all eight planes at the same place modulo 64 KB; 4 × 512 B moves each
        // 2 KB on from the one before (the fewest rows that keep every two of them 2 KB apart, 7 × 2 KB < 62 KB).
        long q = 8L * (4096 + 4) * 128 * 4 + 4096L * (8 + 16 + 32 + 64 + 128 + 256) * 2;
        Assert.AreEqual(q, AnyPrecisionModel.LayerBytes(4096, 4096, 3, 8));
        long parent = doc.RootElement.GetProperty("anyprecision").GetInt64();
        long separate = doc.RootElement.GetProperty("separate_total").GetInt64();
        Assert.IsLessThan(separate / 3.0, (double)parent);
    }
}
