using System.Text.Json;
using AnyPrecML.Cli;

namespace AnyPrecML.Tests;

/// <summary>Runs the CLI in-process and captures what it prints.</summary>
internal static class Cli
{

    public static (int Code, string Out, string Err) Run(params string[] args)
    {
        var o = new StringWriter();
        var e = new StringWriter();
        int code = AnyPrecCli.Run(args, o, e);
        return (code, o.ToString(), e.ToString());
    }
}

[TestClass]
public sealed class CliTests
{
    private static (int Code, string Out, string Err) Run(params string[] args) => Cli.Run(args);

    [TestMethod]
    public void GenerateJsonHasTextTokensAndSpeed()
    {
        var (code, output, err) = Run("generate", "--model", TestData.Stories260K, "--max-tokens", "30", "--json");
        Assert.AreEqual(0, code, err);
        using var doc = JsonDocument.Parse(output);
        Assert.StartsWith("Once upon a time, there was a little girl named Lily.", doc.RootElement.GetProperty("text").GetString());
        Assert.AreEqual(30, doc.RootElement.GetProperty("tokens").GetInt32());
        Assert.IsGreaterThan(0, doc.RootElement.GetProperty("tokens_per_second").GetDouble());
    }

    [TestMethod]
    public void PerplexityJsonMatchesTheLibrary()
    {
        var (code, output, err) = Run("perplexity", "--model", TestData.Stories260K, "--text", TestData.TinyStories, "--context", "256", "--bos-per-line", "--json");
        Assert.AreEqual(0, code, err);
        using var doc = JsonDocument.Parse(output);
        Assert.IsGreaterThan(15000, doc.RootElement.GetProperty("tokens").GetInt64());
        double nll = doc.RootElement.GetProperty("nll").GetDouble();
        Assert.AreEqual(Math.Exp(nll), doc.RootElement.GetProperty("perplexity").GetDouble(), 1e-3);
        Assert.AreEqual(1.7, nll, 0.1);
    }

    [TestMethod]
    public void PerplexityTruncateScoresEachLineOnItsFirstTokens()
    {
        using var dir = TestData.NewTempDir();
        File.WriteAllLines(dir["eval.txt"], File.ReadLines(TestData.TinyStories).Skip(10).Take(9));
        var (code, output, err) = Run("perplexity", "--model", TestData.Stories260K, "--text", dir["eval.txt"], "--bos-per-line", "--truncate", "256", "--json");
        Assert.AreEqual(0, code, err);
        using var doc = JsonDocument.Parse(output);
        Assert.AreEqual("documents", doc.RootElement.GetProperty("framing").GetString());
        Assert.AreEqual(9, doc.RootElement.GetProperty("windows").GetInt32());
        Assert.AreEqual(256, doc.RootElement.GetProperty("context").GetInt32());
        Assert.IsLessThanOrEqualTo(9 * 255, doc.RootElement.GetProperty("tokens").GetInt64());
        Assert.AreEqual(1.7, doc.RootElement.GetProperty("nll").GetDouble(), 0.2);

        (code, _, err) = Run("perplexity", "--model", TestData.Stories260K, "--text", dir["eval.txt"], "--truncate", "256");
        Assert.AreEqual(2, code, "bad input exits 2");
        StringAssert.StartsWith(err, "error: --truncate scores each line as a document: give --bos-per-line too.");
    }

    [TestMethod]
    public void ConvertThenInfoReadsTheHuggingFaceDirectory()
    {
        using var dir = TestData.NewTempDir();
        var (code, _, err) = Run("convert", "--model", TestData.Stories260K, "--output", dir["hf"], "--dtype", "bf16");
        Assert.AreEqual(0, code, err);
        (code, var output, err) = Run("info", "--model", dir["hf"], "--json");
        Assert.AreEqual(0, code, err);
        using var doc = JsonDocument.Parse(output);
        Assert.AreEqual("HuggingFace", doc.RootElement.GetProperty("format").GetString());
        Assert.AreEqual("BF16", doc.RootElement.GetProperty("dtypes")[0].GetString());
        Assert.AreEqual(4, doc.RootElement.GetProperty("n_kv_heads").GetInt32());
        // Converting again onto the same directory is refused unless asked.
        (code, _, err) = Run("convert", "--model", TestData.Stories260K, "--output", dir["hf"]);
        Assert.AreEqual(2, code);
        StringAssert.Contains(err, "not empty");
    }

    [TestMethod]
    public void BadInputIsOneLineOfErrorAndExitCode2()
    {
        var (code, _, err) = Run("generate", "--model", "/nonexistent/model.bin");
        Assert.AreEqual(2, code);
        StringAssert.StartsWith(err, "error: No model at");
        (code, _, err) = Run("generate", "--model", TestData.Stories260K, "--temperature", "-2");
        Assert.AreEqual(2, code);
        StringAssert.Contains(err, "temperature");
        (code, _, _) = Run("generate");
        Assert.AreEqual(2, code, "a missing required option is a parse error");
    }
}
