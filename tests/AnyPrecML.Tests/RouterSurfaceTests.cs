using System.Text;
using System.Text.Json;
using AnyPrecML.AI;
using AnyPrecML.Evaluation;
using AnyPrecML.Generation;
using AnyPrecML.MLNet;
using AnyPrecML.Models;
using AnyPrecML.Onnx;
using AnyPrecML.Quantization;
using Microsoft.Extensions.AI;
using Microsoft.ML;
using Microsoft.ML.Data;

namespace AnyPrecML.Tests;

/// <summary>The precision router per row (score, ML.NET) and per request (chat, serve), on costs seeded into the router's cache.</summary>
[TestClass]
public sealed class RouterSurfaceTests
{
    private static TestData.TempDir _dir = null!;

    /// <summary>Known costs (ms per token): 3, 4 and 5 bits alone, and the three draft/target pairs.</summary>
    internal static readonly RouteCost[] Costs = [new(3, null, 0, 1.0), new(4, null, 0, 2.0), new(5, null, 0, 4.0), new(4, 3, 4, 1.5), new(5, 3, 4, 2.5), new(5, 4, 4, 3.0)];

    [ClassInitialize]
    public static void QuantizeOnce(TestContext _)
    {
        _dir = TestData.NewTempDir();
        TestData.QuantizeStories260K(_dir["ap"], new QuantizerOptions { SeedBits = 3, ParentBits = 5 });
        SeedCosts(_dir["ap"]);
    }

    /// <summary>
    /// Writes <see cref="Costs"/> as the router's cache of <paramref name="directory"/> with this machine's fingerprint for the
    /// ONNX engine at the default accuracy, as `generate` and the ML.NET transformer describe it, so nothing is measured.
    /// </summary>
    internal static void SeedCosts(string directory)
    {
        using var model = AnyPrecisionModel.Open(directory);
        using var engine = new OnnxEngine(model);
        var costs = new PrecisionCosts(PrecisionRouter.Fingerprint(engine, "OnnxEngine int8"), 32, Costs);
        File.WriteAllText(Path.Combine(directory, PrecisionRouter.CacheFileName), JsonSerializer.Serialize(costs));
    }

    [ClassCleanup]
    public static void Cleanup() => _dir.Dispose();

    private static List<JsonElement> Lines(string path) => File.ReadAllLines(path).Select(l => JsonDocument.Parse(l).RootElement.Clone()).ToList();

    [TestMethod]
    public void ScoreRoutesEachRowByItsOwnBudgetAndRefusesABudgetNothingMeets()
    {
        string text = File.ReadLines(TestData.TinyStories).First()[..200];
        File.WriteAllLines(_dir["in.jsonl"],
        [
            JsonSerializer.Serialize(new { text, budget = 1.2 }),  // only 3 bits alone costs ≤ 1.2 ms
            JsonSerializer.Serialize(new { text, budget = 10 }),   // every route: 5 bits alone
            JsonSerializer.Serialize(new { text, budget = 2.6 }),  // 5 bits only by drafting at 3
            JsonSerializer.Serialize(new { text }),                // no budget: --bits
            JsonSerializer.Serialize(new { text, budget = "fast" }),
        ]);
        var (code, _, err) = Cli.Run("score", "--model", _dir["ap"], "--input", _dir["in.jsonl"], "--budget-column", "budget", "--bits", "4", "--completion-tokens", "8", "--output", _dir["out.jsonl"]);
        Assert.AreEqual(0, code, err);
        var rows = Lines(_dir["out.jsonl"]);
        Assert.HasCount(4, rows);
        int Bits(JsonElement row) => row.GetProperty("bits").GetInt32();
        Assert.AreEqual((3, 5, 5, 4), (Bits(rows[0]), Bits(rows[1]), Bits(rows[2]), Bits(rows[3])), "two budgets in one run, two widths");
        Assert.AreEqual(3, rows[0].GetProperty("route").GetProperty("bits").GetInt32());
        StringAssert.Contains(rows[0].GetProperty("route").GetProperty("reason").GetString(), "3 bits is the widest meeting 1.2 ms per token");
        Assert.AreEqual(3, rows[2].GetProperty("route").GetProperty("draft_bits").GetInt32());
        Assert.AreEqual(JsonValueKind.Null, rows[3].GetProperty("route").ValueKind);
        StringAssert.Contains(File.ReadAllText(_dir["out.jsonl.errors.jsonl"]), "budget column 'budget' holds 'fast', not a positive number");

        // What ran is what the line says: the routed rows score as --bits 3 and --bits 5 do, and drafting leaves the greedy completion unchanged.
        double Scored(int bits, out string completion)
        {
            var (c, _, e) = Cli.Run("score", "--model", _dir["ap"], "--input", _dir["in.jsonl"], "--bits", bits.ToString(System.Globalization.CultureInfo.InvariantCulture), "--completion-tokens", "8", "--output", _dir[$"b{bits}.jsonl"]);
            Assert.AreEqual(0, c, e);
            var first = Lines(_dir[$"b{bits}.jsonl"])[0];
            completion = first.GetProperty("completion").GetString()!;
            return first.GetProperty("log_likelihood").GetDouble();
        }
        Assert.AreEqual(Scored(3, out _), rows[0].GetProperty("log_likelihood").GetDouble());
        Assert.AreEqual(Scored(5, out string five), rows[1].GetProperty("log_likelihood").GetDouble());
        Assert.AreEqual(five, rows[2].GetProperty("completion").GetString());
        Assert.AreNotEqual(rows[0].GetProperty("log_likelihood").GetDouble(), rows[1].GetProperty("log_likelihood").GetDouble());

        // A budget no width meets: one clear error by default; the fastest route with a warning by option.
        File.WriteAllLines(_dir["tight.jsonl"], [JsonSerializer.Serialize(new { text, budget = 0.5 })]);
        (code, _, err) = Cli.Run("score", "--model", _dir["ap"], "--input", _dir["tight.jsonl"], "--budget-column", "budget", "--output", _dir["tight-out.jsonl"]);
        Assert.AreEqual(2, code, err);
        Assert.AreEqual("error: no width meets a budget of 0.5 ms per token: the fastest, 3 bits, takes 1 ms on this machine.", err.Trim().Split('\n')[^1]);
        (code, _, err) = Cli.Run("score", "--model", _dir["ap"], "--input", _dir["tight.jsonl"], "--budget-column", "budget", "--over-budget", "fastest", "--output", _dir["fast-out.jsonl"]);
        Assert.AreEqual(0, code, err);
        var fast = Lines(_dir["fast-out.jsonl"])[0];
        Assert.AreEqual(3, fast.GetProperty("bits").GetInt32());
        StringAssert.StartsWith(fast.GetProperty("route").GetProperty("reason").GetString(), "warning: no width meets a budget of 0.5 ms");
        StringAssert.Contains(err, "warning: no width meets a budget of 0.5 ms");
    }

    [TestMethod]
    public async Task ChatAndServeRouteEachRequestByItsLatencyBudget()
    {
        using var client = new AnyPrecisionChatClient(_dir["ap"]);
        async Task<ChatResponse> Ask(double budget, string? over = null)
        {
            var properties = new AdditionalPropertiesDictionary { [AnyPrecisionChatClient.LatencyBudgetProperty] = budget };
            if (over is not null) properties[AnyPrecisionChatClient.OverBudgetProperty] = over;
            return await client.GetResponseAsync("Once upon a time", new ChatOptions { MaxOutputTokens = 12, AdditionalProperties = properties });
        }
        async Task<string> At(int bits) => (await client.GetResponseAsync("Once upon a time", new ChatOptions { ModelId = $"ap@{bits}bit", MaxOutputTokens = 12 })).Text;

        var tight = await Ask(1.2);
        var loose = await Ask(10);
        Assert.AreEqual(("ap@3bit", "ap@5bit"), (tight.ModelId, loose.ModelId), "two budgets, two widths");
        Assert.AreEqual(await At(3), tight.Text);
        Assert.AreEqual(await At(5), loose.Text);
        var decision = (RouteDecision)tight.AdditionalProperties![AnyPrecisionChatClient.RouteProperty]!;
        Assert.AreEqual(3, decision.Route.Bits);
        var drafted = await Ask(2.6);
        Assert.AreEqual(3, ((RouteDecision)drafted.AdditionalProperties![AnyPrecisionChatClient.RouteProperty]!).Route.DraftBits);
        Assert.AreEqual(await At(5), drafted.Text, "drafting keeps the 5-bit greedy text");
        var e = await Assert.ThrowsExactlyAsync<ArgumentException>(() => Ask(0.5));
        Assert.AreEqual("no width meets a budget of 0.5 ms per token: the fastest, 3 bits, takes 1 ms on this machine.", e.Message);
        var over = await Ask(0.5, "fastest");
        StringAssert.StartsWith(((RouteDecision)over.AdditionalProperties![AnyPrecisionChatClient.RouteProperty]!).Reason, "warning: ");
        await Assert.ThrowsExactlyAsync<ArgumentException>(() => client.GetResponseAsync("x", new ChatOptions
        {
            ModelId = "ap@4bit", AdditionalProperties = new() { [AnyPrecisionChatClient.LatencyBudgetProperty] = 10.0 },
        }));

        // "draft_bits": "auto": the width asked for, drafted from its fastest measured pair (5 bits: at 3, 2.5 against 4 ms).
        var auto = await client.GetResponseAsync("Once upon a time", new ChatOptions
        {
            ModelId = "ap@5bit", MaxOutputTokens = 12, AdditionalProperties = new() { [AnyPrecisionChatClient.DraftBitsProperty] = AnyPrecisionChatClient.AutoDraft },
        });
        var autoRoute = (RouteDecision)auto.AdditionalProperties![AnyPrecisionChatClient.RouteProperty]!;
        Assert.AreEqual((5, (int?)3, (double?)null), (autoRoute.Route.Bits, autoRoute.Route.DraftBits, autoRoute.BudgetMs));
        Assert.AreEqual(("ap@5bit", await At(5)), (auto.ModelId, auto.Text), "drafting keeps the 5-bit greedy text");
        await Assert.ThrowsExactlyAsync<ArgumentException>(() => client.GetResponseAsync("x", new ChatOptions
        {
            AdditionalProperties = new() { [AnyPrecisionChatClient.LatencyBudgetProperty] = 10.0, [AnyPrecisionChatClient.DraftBitsProperty] = AnyPrecisionChatClient.AutoDraft },
        }));

        // Over HTTP: the body field, and the decision in the response (an extension field beside usage).
        await using var server = await LoopbackServer.StartAsync(_dir["ap"], new AnyPrecisionServerOptions());
        using var http = new HttpClient();
        async Task<(int Status, JsonElement Body)> Post(string body)
        {
            using var response = await http.PostAsync(new Uri(server.Address, "v1/completions"), new StringContent(body, Encoding.UTF8, "application/json"));
            return ((int)response.StatusCode, JsonDocument.Parse(await response.Content.ReadAsStringAsync()).RootElement.Clone());
        }
        var (status, fast) = await Post("""{"model": "ap", "prompt": "Once upon a time", "max_tokens": 12, "latency_budget_ms": 1.2}""");
        Assert.AreEqual(200, status, fast.ToString());
        Assert.AreEqual("ap@3bit", fast.GetProperty("model").GetString());
        Assert.AreEqual(3, fast.GetProperty("route").GetProperty("bits").GetInt32());
        var (_, slow) = await Post("""{"model": "ap", "prompt": "Once upon a time", "max_tokens": 12, "latency_budget_ms": 10}""");
        Assert.AreEqual(5, slow.GetProperty("route").GetProperty("bits").GetInt32());
        var (bad, error) = await Post("""{"model": "ap", "prompt": "Once upon a time", "latency_budget_ms": 0.5}""");
        Assert.AreEqual(400, bad);
        StringAssert.Contains(error.GetProperty("error").GetProperty("message").GetString(), "no width meets a budget of 0.5 ms per token");
        var (_, autoHttp) = await Post("""{"model": "ap@5bit", "prompt": "Once upon a time", "max_tokens": 12, "draft_bits": "auto"}""");
        Assert.AreEqual(3, autoHttp.GetProperty("route").GetProperty("draft_bits").GetInt32());
        Assert.AreEqual(JsonValueKind.Null, autoHttp.GetProperty("route").GetProperty("budget_ms").ValueKind);
        var (badDraft, draftError) = await Post("""{"model": "ap@5bit", "prompt": "x", "draft_bits": "fast"}""");
        Assert.AreEqual(400, badDraft);
        StringAssert.Contains(draftError.GetProperty("error").GetProperty("message").GetString(), "'draft_bits' must be an integer or \"auto\"");
    }

    private sealed class BudgetRow
    {
        public string Text { get; set; } = "";
        public double Budget { get; set; }
    }

    [TestMethod]
    public void MLNetTransformerRoutesByABudgetColumnAndSavesAProfilesWidths()
    {
        var ml = new MLContext(seed: 0);
        string text = File.ReadLines(TestData.TinyStories).First()[..160];
        var data = ml.Data.LoadFromEnumerable(new[] { new BudgetRow { Text = text, Budget = 1.2 }, new BudgetRow { Text = text, Budget = 10 }, new BudgetRow { Text = text, Budget = double.NaN } });
        using var routed = ml.Transforms.AnyPrecisionQuantize(new AnyPrecisionQuantizeOptions { ModelPath = _dir["ap"], Bits = 4, BudgetColumnName = "Budget" }).Fit(data);
        var view = routed.Transform(data);
        CollectionAssert.AreEqual(new[] { 3f, 5f, 4f }, view.GetColumn<float>("Bits").ToArray(), "a budget per row: 1.2 ms → 3 bits, 10 ms → 5 bits, none → Bits");
        var reasons = view.GetColumn<string>("Route").ToArray();
        StringAssert.Contains(reasons[0], "3 bits is the widest meeting 1.2 ms");
        Assert.AreEqual("", reasons[2]);
        var ll = view.GetColumn<float>("LogLikelihood").ToArray();
        using var at3 = ml.Transforms.AnyPrecisionQuantize(new AnyPrecisionQuantizeOptions { ModelPath = _dir["ap"], Bits = 3 }).Fit(data);
        Assert.AreEqual(at3.Transform(data).GetColumn<float>("LogLikelihood").First(), ll[0], "the routed row ran at 3 bits");

        // A profile: rows run at its widths, a saved pipeline keeps them (no file needed beside the model), and Bits returns to one width.
        string path = _dir["p.json"];
        PrecisionProfile profile;
        using (var model = AnyPrecisionModel.Open(_dir["ap"]))
        {
            profile = PrecisionProfileSearch.Random(model, 4.5, seed: 2);
            profile.Save(model, path);
        }
        using var profiled = ml.Transforms.AnyPrecisionQuantize(new AnyPrecisionQuantizeOptions { ModelPath = _dir["ap"], ProfilePath = path }).Fit(data);
        var scored = profiled.Transform(data).GetColumn<float>("LogLikelihood").ToArray();
        Assert.AreEqual((float)profile.AverageBits, profiled.Transform(data).GetColumn<float>("Bits").Last(), 1e-6);
        ml.Model.Save(profiled, data.Schema, _dir["profiled.zip"]);
        File.Delete(path);
        var loaded = new MLContext().Model.Load(_dir["profiled.zip"], out _);
        CollectionAssert.AreEqual(scored, loaded.Transform(data).GetColumn<float>("LogLikelihood").ToArray());
        profiled.Bits = 4;
        Assert.IsNull(profiled.Profile);
        Assert.AreNotEqual(scored[2], profiled.Transform(data).GetColumn<float>("LogLikelihood").Last());
    }
}
