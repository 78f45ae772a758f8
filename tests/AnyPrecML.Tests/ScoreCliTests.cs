using System.Text.Json;
using AnyPrecML.Quantization;
using AnyPrecML.Models;

namespace AnyPrecML.Tests;

[TestClass]
public sealed class ScoreCliTests
{
    private static TestData.TempDir _dir = null!;

    [ClassInitialize]
    public static void QuantizeOnce(TestContext _)
    {
        _dir = TestData.NewTempDir();
        using var source = LlamaCheckpoint.Open(TestData.Stories260K);
        AnyPrecisionQuantizer.Quantize(source, _dir["ap"], new UniformSensitivity(), new QuantizerOptions());
    }

    [ClassCleanup]
    public static void Cleanup() => _dir.Dispose();

    private static List<JsonElement> Lines(string path) =>
        File.ReadAllLines(path).Select(l => JsonDocument.Parse(l).RootElement.Clone()).ToList();

    [TestMethod]
    public void ScoreWritesOneLinePerRowForJsonlAndCsv()
    {
        var texts = File.ReadLines(TestData.TinyStories).Take(6).Select(l => l[..Math.Min(120, l.Length)]).ToList();
        texts.Insert(2, ""); // an empty row keeps its place and gets the documented values
        File.WriteAllLines(_dir["in.jsonl"], texts.Select(t => JsonSerializer.Serialize(new { id = 1, text = t })));

        var (code, _, err) = Cli.Run("score", "--model", _dir["ap"], "--input", _dir["in.jsonl"], "--bits", "3", "--output", _dir["full.jsonl"]);
        Assert.AreEqual(0, code, err);
        var full = Lines(_dir["full.jsonl"]);
        Assert.HasCount(texts.Count, full);
        CollectionAssert.AreEqual(Enumerable.Range(0, texts.Count).ToArray(), full.Select(l => l.GetProperty("row").GetInt32()).ToArray());
        Assert.AreEqual(0, full[2].GetProperty("token_count").GetInt32());
        Assert.AreEqual(JsonValueKind.Null, full[2].GetProperty("perplexity").ValueKind);

        // Another width gives other numbers; CSV input with quoting reads the same texts.
        File.WriteAllLines(_dir["in.csv"], new[] { "id,text" }.Concat(texts.Select((t, i) => $"{i},\"{t.Replace("\"", "\"\"")}\"")));
        (code, _, err) = Cli.Run("score", "--model", _dir["ap"], "--input", _dir["in.csv"], "--bits", "8", "--output", _dir["b8.jsonl"]);
        Assert.AreEqual(0, code, err);
        var b8 = Lines(_dir["b8.jsonl"]);
        Assert.HasCount(texts.Count, b8);
        Assert.AreEqual(full[0].GetProperty("token_count").GetInt32(), b8[0].GetProperty("token_count").GetInt32(), "same text, same tokens");
        Assert.AreNotEqual(full[0].GetProperty("log_likelihood").GetDouble(), b8[0].GetProperty("log_likelihood").GetDouble());
    }

    [TestMethod]
    public void ScoreRejectsBadInputClearly()
    {
        File.WriteAllLines(_dir["bad.jsonl"], ["{\"other\": \"x\"}"]);
        var (code, _, err) = Cli.Run("score", "--model", _dir["ap"], "--input", _dir["bad.jsonl"], "--output", _dir["bad-out.jsonl"]);
        Assert.AreEqual(0, code, "an invalid row is reported, not fatal");
        StringAssert.Contains(File.ReadAllText(_dir["bad-out.jsonl.errors.jsonl"]), "no property 'text'");
        File.WriteAllLines(_dir["bad.csv"], ["id,other", "1,x"]);
        (code, _, err) = Cli.Run("score", "--model", _dir["ap"], "--input", _dir["bad.csv"], "--output", _dir["bad-out1.jsonl"]);
        Assert.AreEqual(2, code, "a header without the column is a bad file");
        StringAssert.Contains(err, "no column 'text'");
        (code, _, err) = Cli.Run("score", "--model", _dir["ap"], "--input", _dir["bad.jsonl"], "--bits", "9", "--output", _dir["bad-out2.jsonl"]);
        Assert.AreEqual(2, code);
        StringAssert.Contains(err, "9");
        Assert.IsFalse(File.Exists(_dir["bad-out2.jsonl"]), "a run refused before its first row leaves no output file");
        (code, _, err) = Cli.Run("score", "--model", TestData.Stories260K, "--input", _dir["bad.jsonl"], "--output", _dir["bad-out3.jsonl"]);
        Assert.AreEqual(2, code);
        StringAssert.Contains(err, "not an any-precision model");
    }

    [TestMethod]
    public void PerplexityIsTheSameThroughEitherEngine()
    {
        File.WriteAllLines(_dir["eval.txt"], File.ReadLines(TestData.TinyStories).Skip(3).Take(2));
        double Ppl(string engine, string accuracy = "fp32", string? kvCache = null)
        {
            string[] cache = kvCache is null ? [] : ["--kv-cache", kvCache];
            var (code, json, err) = Cli.Run(["perplexity", "--model", _dir["ap"], "--bits", "4", "--engine", engine, "--accuracy", accuracy, .. cache, "--text", _dir["eval.txt"], "--json"]);
            Assert.AreEqual(0, code, err);
            using var doc = JsonDocument.Parse(json);
            return doc.RootElement.GetProperty("perplexity").GetDouble();
        }
        double reference = Ppl("reference");
        Assert.AreEqual(reference, Ppl("onnx", kvCache: "fp32"), 1e-3);
        var (refused, _, why) = Cli.Run("perplexity", "--model", _dir["ap"], "--engine", "reference", "--kv-cache", "bf16", "--text", _dir["eval.txt"]);
        Assert.AreEqual(2, refused, why);
        StringAssert.StartsWith(why.Trim(), "error: --kv-cache applies to the onnx engine");
        // The defaults, int8 kernels and a bf16 cache, stay within 1%; the bf16 cache alone within half a percent.
        Assert.AreEqual(reference, Ppl("onnx", "int8", "bf16"), 0.01 * reference);
        Assert.AreEqual(reference, Ppl("onnx", "fp32", "bf16"), 0.005 * reference);
        var (c2, _, e2) = Cli.Run("generate", "--model", TestData.Stories260K, "--engine", "onnx", "--max-tokens", "3");
        Assert.AreEqual(2, c2);
        StringAssert.Contains(e2, "not one");
    }
}
