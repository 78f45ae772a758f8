using System.Text.Json;
using System.Text.Json.Nodes;
using AnyPrecML.Generation;
using AnyPrecML.Models;
using AnyPrecML.Quantization;

namespace AnyPrecML.Tests;

[TestClass]
public sealed class PrecisionRouterTests
{
    private static readonly PrecisionCosts Costs = new("test machine", 32,
    [
        new(3, null, 0, 1.0), new(4, null, 0, 2.0), new(5, null, 0, 4.0),
        new(4, 3, 4, 1.5), new(5, 3, 4, 2.5), new(5, 4, 4, 3.0),
    ]);

    [TestMethod]
    public void ChooseTakesTheWidestTargetMeetingTheBudgetAloneFirstThenByItsFastestPair()
    {
        (int Bits, int? Draft) Pick(double ms) { var r = PrecisionRouter.Choose(Costs, ms).Route; return (r.Bits, r.DraftBits); }
        Assert.AreEqual((5, (int?)null), Pick(10));
        Assert.AreEqual((5, (int?)3), Pick(3));
        Assert.AreEqual((4, (int?)null), Pick(2));
        Assert.AreEqual((4, (int?)3), Pick(1.6));
        Assert.AreEqual((3, (int?)null), Pick(1.2));
        // Against brute force over a sweep of budgets: the route meets the budget, and no route meeting it has a wider target.
        for (double ms = 1; ms < 6; ms += 0.05)
        {
            var chosen = PrecisionRouter.Choose(Costs, ms).Route;
            Assert.IsLessThanOrEqualTo(ms, chosen.MsPerToken);
            Assert.AreEqual(Costs.Routes.Where(r => r.MsPerToken <= ms).Max(r => r.Bits), chosen.Bits, $"{ms} ms");
        }
        var e = Assert.ThrowsExactly<ArgumentException>(() => PrecisionRouter.Choose(Costs, 0.5));
        Assert.AreEqual("no width meets a budget of 0.5 ms per token: the fastest, 3 bits, takes 1 ms on this machine.", e.Message);
        Assert.ThrowsExactly<ArgumentException>(() => PrecisionRouter.Choose(Costs, 0));
    }

    [TestMethod]
    public void FastestForTakesAPairOnlyWhenItBeatsTheTargetAlone()
    {
        var pair = PrecisionRouter.FastestFor(Costs, 4);
        Assert.AreEqual((4, (int?)3), (pair.Route.Bits, pair.Route.DraftBits));
        Assert.IsNull(pair.BudgetMs);
        Assert.AreEqual(1.5, pair.Route.MsPerToken);
        // Against brute force: every width's choice is its cheapest route, target-only on a tie or when it has no pair.
        foreach (int bits in new[] { 3, 4, 5 })
        {
            var chosen = PrecisionRouter.FastestFor(Costs, bits).Route;
            Assert.AreEqual(Costs.Routes.Where(r => r.Bits == bits).Min(r => r.MsPerToken), chosen.MsPerToken, $"{bits} bits");
        }
        var slowPair = new PrecisionCosts("test machine", 32, [new(3, null, 0, 1.0), new(5, null, 0, 2.0), new(5, 3, 4, 2.5)]);
        var alone = PrecisionRouter.FastestFor(slowPair, 5);
        Assert.IsNull(alone.Route.DraftBits);
        Assert.AreEqual("5 bits alone takes 2 ms per token; its fastest pair, 5 bits drafted at 3 (k = 4), takes 2.5 ms", alone.Reason);
        Assert.ThrowsExactly<ArgumentException>(() => PrecisionRouter.FastestFor(slowPair, 8));
    }

    /// <summary>Costs depend on the kernels that run, so the fingerprint names them: the same model on two kernel paths gets two fingerprints.</summary>
    [TestMethod]
    public void TheFingerprintNamesTheKernelsThatRun()
    {
        using var dir = TestData.NewTempDir();
        TestData.QuantizeStories260K(dir["ap"], new QuantizerOptions { SeedBits = 3, ParentBits = 4 });
        using var model = AnyPrecisionModel.Open(dir["ap"]);
        using var pool = new AnyPrecML.Kernels.KernelThreadPool(1);
        string Print(AnyPrecML.Kernels.KernelPath path, out string kernels)
        {
            using var engine = new AnyPrecML.Onnx.OnnxEngine(model, new AnyPrecML.Onnx.OnnxEngineOptions { Backend = new AnyPrecML.Kernels.CpuBitplaneBackend(path, pool) });
            kernels = ((IAnyPrecisionEngine)engine).Kernels;
            return PrecisionRouter.Fingerprint(engine, "OnnxEngine int8");
        }
        string scalar = Print(AnyPrecML.Kernels.KernelPath.Scalar, out string scalarKernels), vector = Print(AnyPrecML.Kernels.KernelPath.Vector128, out string vectorKernels);
        StringAssert.Contains(scalarKernels, "CPU Scalar");
        StringAssert.Contains(scalar, scalarKernels);
        StringAssert.Contains(vector, vectorKernels);
        Assert.AreNotEqual(scalar, vector);
    }

    [TestMethod]
    public void GenerateRoutesByBudgetWithCostsMeasuredOnceAndCachedForThisMachine()
    {
        using var dir = TestData.NewTempDir();
        TestData.QuantizeStories260K(dir["ap"], new QuantizerOptions { SeedBits = 3, ParentBits = 5 });
        JsonElement Route(double budget, out int code, out string err)
        {
            var (c, output, e) = Cli.Run("generate", "--model", dir["ap"], "--engine", "reference", "--max-tokens", "16", "--latency-budget-ms", budget.ToString(System.Globalization.CultureInfo.InvariantCulture), "--json");
            (code, err) = (c, e);
            return c == 0 ? JsonDocument.Parse(output).RootElement.GetProperty("route").Clone() : default;
        }

        // First run measures (every width and pair) and caches; a generous budget gets the parent width alone.
        var first = Route(1e6, out int code, out string err);
        Assert.AreEqual(0, code, err);
        Assert.AreEqual("measured now", first.GetProperty("costs").GetString());
        Assert.AreEqual(5, first.GetProperty("bits").GetInt32());
        Assert.AreEqual(JsonValueKind.Null, first.GetProperty("draft_bits").ValueKind);
        string cache = dir["ap/" + PrecisionRouter.CacheFileName];
        var saved = JsonNode.Parse(File.ReadAllText(cache))!;
        Assert.HasCount(3 + 3, saved["Routes"]!.AsArray(), "3 widths and 3 pairs d < t");
        Assert.AreEqual("cached", Route(1e6, out _, out _).GetProperty("costs").GetString());

        // With known costs in the cache (this machine's fingerprint kept), two budgets in two requests get two widths.
        saved["Routes"] = JsonSerializer.SerializeToNode(Costs.Routes);
        File.WriteAllText(cache, saved.ToJsonString());
        var tight = Route(1.2, out code, out err);
        Assert.AreEqual(0, code, err);
        Assert.AreEqual(3, tight.GetProperty("bits").GetInt32());
        var pair = Route(2.6, out _, out _);
        Assert.AreEqual((5, 3), (pair.GetProperty("bits").GetInt32(), pair.GetProperty("draft_bits").GetInt32()));
        StringAssert.Contains(pair.GetProperty("reason").GetString(), "drafting at 3 bits");

        // --speculate: the fastest route for the target --bits names, from the same cached costs; greedy text is the target's.
        JsonElement Speculate(int target, out string text, params string[] extra)
        {
            var (c, output, e) = Cli.Run(["generate", "--model", dir["ap"], "--engine", "reference", "--max-tokens", "16", "--bits", target.ToString(), "--speculate", "--json", .. extra]);
            Assert.AreEqual(0, c, e);
            var root = JsonDocument.Parse(output).RootElement;
            text = root.GetProperty("text").GetString()!;
            return root.GetProperty("route").Clone();
        }
        var five = Speculate(5, out string speculated);
        Assert.AreEqual((5, 3, 4), (five.GetProperty("bits").GetInt32(), five.GetProperty("draft_bits").GetInt32(), five.GetProperty("draft_tokens").GetInt32()));
        Assert.AreEqual(JsonValueKind.Null, five.GetProperty("budget_ms").ValueKind);
        StringAssert.Contains(five.GetProperty("reason").GetString(), "5 bits drafted at 3 (k = 4) takes 2.5 ms per token against 4 ms alone");
        var (plainCode, plainOut, plainErr) = Cli.Run("generate", "--model", dir["ap"], "--engine", "reference", "--max-tokens", "16", "--bits", "5", "--json");
        Assert.AreEqual(0, plainCode, plainErr);
        Assert.AreEqual(JsonDocument.Parse(plainOut).RootElement.GetProperty("text").GetString(), speculated, "greedy speculative output is the target's");
        var three = Speculate(3, out _);
        Assert.AreEqual(JsonValueKind.Null, three.GetProperty("draft_bits").ValueKind, "the seed width has no narrower draft");
        StringAssert.Contains(three.GetProperty("reason").GetString(), "no narrower draft width");
        var (both, _, bothErr) = Cli.Run("generate", "--model", dir["ap"], "--bits", "5", "--speculate", "--draft-bits", "3");
        Assert.AreEqual(2, both, "bad input exits 2");
        StringAssert.Contains(bothErr, "drop --draft-bits");
        var (twice, _, twiceErr) = Cli.Run("generate", "--model", dir["ap"], "--speculate", "--latency-budget-ms", "5");
        Assert.AreEqual(2, twice, "bad input exits 2");
        StringAssert.Contains(twiceErr, "give one");

        Route(0.5, out code, out err);
        Assert.AreEqual(2, code, "bad input exits 2");
        Assert.AreEqual("error: no width meets a budget of 0.5 ms per token: the fastest, 3 bits, takes 1 ms on this machine.", err.Trim().Split('\n')[^1], "the last line of stderr is the error (an engine line may precede it)");

        // Another machine's costs are not trusted: a foreign fingerprint is measured again.
        saved["Fingerprint"] = "another machine";
        File.WriteAllText(cache, saved.ToJsonString());
        Assert.AreEqual("measured now", Route(1e6, out _, out _).GetProperty("costs").GetString());

        var (c2, _, e2) = Cli.Run("generate", "--model", dir["ap"], "--bits", "4", "--latency-budget-ms", "5");
        Assert.AreEqual(2, c2, "bad input exits 2");
        StringAssert.Contains(e2, "drop --bits");
    }
}
