using System.Text.Json;

namespace AnyPrecML.Tests;

/// <summary><c>anyprec bench engine</c> on stories260K: its JSON, and decode at a depth (<c>--depth</c>).</summary>
[TestClass]
public sealed class BenchEngineTests
{
    private static ChatFixture _fixture = null!;

    [ClassInitialize]
    public static void Init(TestContext _) => _fixture = new ChatFixture();

    [ClassCleanup]
    public static void Cleanup() => _fixture.Dispose();

    [TestMethod]
    public void DecodeAtADepthReportsItAndSplitsOutTheAttention()
    {
        var (code, output, err) = Cli.Run("bench", "engine", "-m", _fixture.ModelDirectory, "-n", "4", "--bits", "3", "5", "--depth", "300", "--json");
        Assert.AreEqual(0, code, err);
        using var doc = JsonDocument.Parse(output);
        var root = doc.RootElement;
        Assert.AreEqual(300, root.GetProperty("decode_depth").GetInt32());
        Assert.AreEqual(4, root.GetProperty("decode_steps").GetInt32());
        Assert.AreEqual("bf16", root.GetProperty("kv_cache").GetString(), "the CPU default");
        var rows = root.GetProperty("rows").EnumerateArray().ToList();
        CollectionAssert.AreEqual(new[] { 3.0, 5.0 }, rows.Select(r => r.GetProperty("bits").GetDouble()).ToArray());
        foreach (var row in rows)
        {
            Assert.IsGreaterThan(0, row.GetProperty("onnx_tokens_per_second").GetDouble());
            // stories260K's 5 layers run the CPU attention operator on every step; its time is counted apart from the rest.
            Assert.IsGreaterThan(0, row.GetProperty("attention_ms_per_token").GetDouble());
        }
    }

    [TestMethod]
    public void AnFp32CacheIsTakenAndAnUnknownTypeIsOneLineError()
    {
        var (code, output, err) = Cli.Run("bench", "engine", "-m", _fixture.ModelDirectory, "-n", "2", "--bits", "3", "--kv-cache", "fp32", "--json");
        Assert.AreEqual(0, code, err);
        using (var doc = JsonDocument.Parse(output)) Assert.AreEqual("fp32", doc.RootElement.GetProperty("kv_cache").GetString());
        (code, output, err) = Cli.Run("bench", "engine", "-m", _fixture.ModelDirectory, "-n", "2", "--kv-cache", "f16");
        Assert.AreEqual(2, code, output + err);
        var lines = err.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.HasCount(1, lines, err);
        StringAssert.StartsWith(lines[0], "error:");
        StringAssert.Contains(lines[0], "f16");
    }

    [TestMethod]
    public void ADepthPastTheContextIsOneLineError()
    {
        // stories260K's context is 512 tokens: 500 + a 4-token prompt + 16 steps do not fit.
        var (code, output, err) = Cli.Run("bench", "engine", "-m", _fixture.ModelDirectory, "-n", "16", "--depth", "500");
        Assert.AreEqual(2, code, output + err);
        var lines = err.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.HasCount(1, lines, err);
        StringAssert.StartsWith(lines[0], "error: --depth 500");
    }
}
