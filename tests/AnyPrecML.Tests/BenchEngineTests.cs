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

    /// <summary><c>bench batch</c>: one row per width and batch size, the gain over the first size, and bad sizes refused in one line.</summary>
    [TestMethod]
    public void BenchBatchReportsEveryWidthAndBatchSize()
    {
        var (code, output, err) = Cli.Run("bench", "batch", "-m", _fixture.ModelDirectory, "--batch", "1", "3", "-n", "2", "--rounds", "1", "--json");
        Assert.AreEqual(0, code, err);
        using var doc = JsonDocument.Parse(output);
        var rows = doc.RootElement.GetProperty("rows").EnumerateArray().ToList();
        CollectionAssert.AreEqual(new[] { (3, 1), (3, 3), (8, 1), (8, 3) }, rows.Select(r => (r.GetProperty("bits").GetInt32(), r.GetProperty("batch").GetInt32())).ToArray(), "the seed and the parent width by default");
        foreach (var row in rows)
        {
            double ms = row.GetProperty("ms_per_pass").GetDouble();
            int batch = row.GetProperty("batch").GetInt32();
            Assert.IsGreaterThan(0, ms);
            Assert.AreEqual(batch * 1000 / ms, row.GetProperty("tokens_per_second").GetDouble(), 0.05 * batch * 1000 / ms + 0.1);
            if (batch == 1) Assert.AreEqual(1.0, row.GetProperty("gain").GetDouble());
        }
        var (bad, _, badErr) = Cli.Run("bench", "batch", "-m", _fixture.ModelDirectory, "--batch", "0");
        Assert.AreEqual(2, bad);
        Assert.AreEqual("error: --batch must list sizes of 1 or more.", badErr.Trim());
    }

    /// <summary>
    /// <c>bench kernels --tokens</c>: every kernel measured at exactly the token counts asked for (here M = 2, a batch of
    /// two sequences), one token when <c>--quick</c> is given alone (an option left out once read as an empty list, and
    /// the bench refused to run), and a count below 1 refused in one line.
    /// </summary>
    [TestMethod]
    public void BenchKernelsMeasuresTheTokenCountsAskedFor()
    {
        (string[] Tokens, int M)[] cases = [(["--tokens", "2"], 2), ([], 1)];
        foreach (var (tokens, m) in cases)
        {
            var (code, output, err) = Cli.Run(["bench", "kernels", "--quick", "--layers", "0", .. tokens, "--json"]);
            Assert.AreEqual(0, code, err);
            using var doc = JsonDocument.Parse(output);
            var results = doc.RootElement.GetProperty("results").EnumerateArray().ToList();
            Assert.IsTrue(results.All(x => x.GetProperty("m").GetInt32() == m && x.GetProperty("ms").GetDouble() > 0), output);
            CollectionAssert.AreEqual(new[] { 2, 3, 4, 5, 6, 7, 8 },
                results.Where(x => x.GetProperty("kernel").GetString() == "bitplane-int8").Select(x => x.GetProperty("bits").GetInt32()).ToArray());
        }
        var (bad, _, badErr) = Cli.Run("bench", "kernels", "--tokens", "0");
        Assert.AreEqual(2, bad);
        Assert.AreEqual("error: --tokens must list token counts of 1 or more.", badErr.Trim());
    }

    /// <summary><c>bench chat</c>: each turn with and without the prompt cache; the cached run's later turns reuse the earlier ones.</summary>
    [TestMethod]
    public void BenchChatReusesEarlierTurnsOnlyWithThePromptCache()
    {
        var (code, output, err) = Cli.Run("bench", "chat", "-m", _fixture.ModelDirectory, "--turns", "2", "--system-repeats", "2", "--max-tokens", "4", "--json");
        Assert.AreEqual(0, code, err);
        using var doc = JsonDocument.Parse(output);
        var rows = doc.RootElement.GetProperty("rows").EnumerateArray().ToList();
        CollectionAssert.AreEqual(new[] { (false, 1), (false, 2), (true, 1), (true, 2) }, rows.Select(r => (r.GetProperty("prompt_cache").GetBoolean(), r.GetProperty("turn").GetInt32())).ToArray());
        long Reused(int i) => rows[i].GetProperty("reused_tokens").GetInt64();
        Assert.AreEqual((0L, 0L, 0L), (Reused(0), Reused(1), Reused(2)));
        int firstPrompt = rows[2].GetProperty("prompt_tokens").GetInt32();
        Assert.IsGreaterThan(firstPrompt / 2L, Reused(3), "the second turn reuses most of the first turn's prompt");
        Assert.IsLessThan((long)rows[3].GetProperty("prompt_tokens").GetInt32(), Reused(3), "the new question is prefilled");
        Assert.AreEqual(rows[1].GetProperty("prompt_tokens").GetInt32(), rows[3].GetProperty("prompt_tokens").GetInt32(), "the same conversation either way");
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
