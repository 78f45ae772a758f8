using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text.Json;
using AnyPrecML.Models;

namespace AnyPrecML.Generation;

/// <summary>Measured decode cost of one way to serve: a width alone, or a draft/target pair.</summary>
/// <param name="Bits">Target width: the output is this width's.</param>
/// <param name="DraftBits">Draft width of speculative decoding; null for target-only.</param>
/// <param name="DraftTokens">k of speculative decoding (0 for target-only).</param>
/// <param name="MsPerToken">Milliseconds per generated token, measured on this machine.</param>
public sealed record RouteCost(int Bits, int? DraftBits, int DraftTokens, double MsPerToken);

/// <summary>Per-token costs of every width and draft/target pair of one model on one machine, with what they were measured on.</summary>
public sealed record PrecisionCosts(string Fingerprint, int Tokens, IReadOnlyList<RouteCost> Routes);

/// <summary>What the router chose, and why: for a budget (<see cref="PrecisionRouter.Choose"/>), or the fastest route for a width (<see cref="PrecisionRouter.FastestFor"/>, no budget).</summary>
public sealed record RouteDecision(RouteCost Route, double? BudgetMs, string Reason);

/// <summary>
/// Picks a width per request from a per-token latency budget: the highest target width whose measured cost meets the
/// budget, served target-only when that meets it, else by the fastest draft/target pair with that target (speculative
/// decoding keeps the target's output, so the target width is the quality). Costs come from a short greedy calibration on
/// the running machine, cached beside the model with the machine's fingerprint and re-measured when it does not match.
/// </summary>
public static class PrecisionRouter
{
    /// <summary>The cache file written beside the model.</summary>
    public const string CacheFileName = "router-costs.json";

    /// <summary>Draft length measured for every pair.</summary>
    public const int PairDraftTokens = 4;

    /// <summary>
    /// This machine and engine, as the costs depend on them: CPU model, core count, OS, .NET runtime, the engine's
    /// description (kind, accuracy) and its <see cref="IAnyPrecisionEngine.Kernels"/> (the instruction path and threads
    /// that run: the same CPU under DOTNET_EnableAVX512=0 runs other kernels at other costs), plus the model's shape.
    /// </summary>
    public static string Fingerprint(IAnyPrecisionEngine engine, string engineDescription)
    {
        string cpu = RuntimeInformation.ProcessArchitecture.ToString();
        if (File.Exists("/proc/cpuinfo"))
            cpu = File.ReadLines("/proc/cpuinfo").FirstOrDefault(l => l.StartsWith("model name", StringComparison.Ordinal))?.Split(':', 2)[1].Trim() ?? cpu;
        var c = engine.Config;
        return $"{cpu}; {Environment.ProcessorCount} cores; {RuntimeInformation.OSDescription}; {RuntimeInformation.FrameworkDescription}; {engineDescription}; {engine.Kernels}; " +
               $"{c.Layers}x{c.Dim}x{c.HiddenDim} vocab {c.VocabSize}; {engine.SeedBits}..{engine.ParentBits} bits";
    }

    /// <summary>
    /// The costs cached in <paramref name="modelDirectory"/> when their fingerprint is this machine's, else measured now
    /// (<paramref name="tokens"/> greedy tokens per route) and cached (written to a temporary name, then renamed; a
    /// read-only directory just goes uncached). <paramref name="measured"/> says which; <paramref name="progress"/> counts the routes measured.
    /// </summary>
    public static PrecisionCosts Load(IAnyPrecisionEngine engine, string modelDirectory, string engineDescription, out bool measured, int tokens = 32,
        IProgress<(int Done, int Total)>? progress = null)
    {
        string fingerprint = Fingerprint(engine, engineDescription), path = Path.Combine(modelDirectory, CacheFileName);
        if (File.Exists(path))
        {
            try
            {
                var cached = JsonSerializer.Deserialize<PrecisionCosts>(File.ReadAllText(path));
                if (cached is { Routes.Count: > 0 } && cached.Fingerprint == fingerprint && cached.Tokens == tokens) { measured = false; return cached; }
            }
            catch (JsonException) { } // a damaged cache is measured again and overwritten
        }
        var costs = Measure(engine, fingerprint, tokens, progress);
        try
        {
            string temp = path + ".tmp";
            File.WriteAllText(temp, JsonSerializer.Serialize(costs, new JsonSerializerOptions { WriteIndented = true }));
            File.Move(temp, path, overwrite: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }
        measured = true;
        return costs;
    }

    /// <summary>Times greedy decoding of <paramref name="tokens"/> tokens from BOS for every width and every pair d &lt; t (k = <see cref="PairDraftTokens"/>), after one untimed warm-up each.</summary>
    public static PrecisionCosts Measure(IAnyPrecisionEngine engine, string fingerprint, int tokens = 32, IProgress<(int Done, int Total)>? progress = null)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(tokens, 2);
        var c = engine.Config;
        tokens = Math.Min(tokens, c.MaxSeqLen - PairDraftTokens - 2);
        int[] prompt = [c.BosTokenId];
        var routes = new List<RouteCost>();
        int widths = engine.ParentBits - engine.SeedBits + 1, total = widths + widths * (widths - 1) / 2;
        for (int t = engine.SeedBits; t <= engine.ParentBits; t++)
        {
            int bits = t;
            routes.Add(new RouteCost(t, null, 0, Time(() => SpeculativeGenerator.TargetOnlyGreedy(engine, bits, prompt, tokens)) / tokens));
            progress?.Report((routes.Count, total));
            for (int d = engine.SeedBits; d < t; d++)
            {
                int draft = d;
                routes.Add(new RouteCost(t, d, PairDraftTokens, Time(() => SpeculativeGenerator.Greedy(engine, draft, bits, PairDraftTokens, prompt, tokens)) / tokens));
                progress?.Report((routes.Count, total));
            }
        }
        return new PrecisionCosts(fingerprint, tokens, routes);
    }

    /// <summary>
    /// The route for a budget of <paramref name="budgetMs"/> per token: the highest target width some route meets it
    /// with; target-only when that meets it, else its fastest pair.
    /// </summary>
    /// <param name="costs">The measured costs.</param>
    /// <param name="budgetMs">Milliseconds per token.</param>
    /// <param name="fastestWhenUnmet">When no route meets the budget, take the fastest with a reason starting "warning: " instead of throwing.</param>
    /// <exception cref="ArgumentException">No route meets the budget and <paramref name="fastestWhenUnmet"/> is false (the message names the fastest and its cost).</exception>
    public static RouteDecision Choose(PrecisionCosts costs, double budgetMs, bool fastestWhenUnmet = false)
    {
        ArgumentNullException.ThrowIfNull(costs);
        if (!(budgetMs > 0)) throw new ArgumentException($"the latency budget must be positive, not {budgetMs} ms.");
        var meeting = costs.Routes.Where(r => r.MsPerToken <= budgetMs).ToList();
        if (meeting.Count == 0)
        {
            var fastest = costs.Routes.MinBy(r => r.MsPerToken)!;
            string unmet = $"no width meets a budget of {budgetMs:0.###} ms per token: the fastest, {Describe(fastest)}, takes {fastest.MsPerToken:0.###} ms on this machine";
            if (fastestWhenUnmet) return new RouteDecision(fastest, budgetMs, $"warning: {unmet}; running it, over budget, as asked");
            throw new ArgumentException(unmet + ".");
        }
        int best = meeting.Max(r => r.Bits);
        var plain = meeting.FirstOrDefault(r => r.Bits == best && r.DraftBits is null);
        var chosen = plain ?? meeting.Where(r => r.Bits == best).MinBy(r => r.MsPerToken)!;
        var alone = costs.Routes.FirstOrDefault(r => r.Bits == best && r.DraftBits is null);
        string reason = plain is not null
            ? $"{best} bits is the widest meeting {budgetMs:0.###} ms per token ({chosen.MsPerToken:0.###} ms)"
              + (best < costs.Routes.Max(r => r.Bits) ? $"; {best + 1} bits needs {costs.Routes.Where(r => r.Bits == best + 1).Min(r => r.MsPerToken):0.###} ms at best" : "")
            : $"{best} bits alone takes {alone?.MsPerToken:0.###} ms, over {budgetMs:0.###} ms; drafting at {chosen.DraftBits} bits brings it to {chosen.MsPerToken:0.###} ms";
        return new RouteDecision(chosen, budgetMs, reason);
    }

    /// <summary>
    /// The fastest way to serve <paramref name="bits"/> bits on this machine: its fastest draft/target pair when one
    /// beats the width alone, else the width alone (speculative decoding keeps the target's output either way; it pays
    /// where a wide target costs several narrow drafts, e.g. b = 8 on AVX2). The decision has no budget.
    /// </summary>
    /// <exception cref="ArgumentException">The costs hold no route for <paramref name="bits"/>.</exception>
    public static RouteDecision FastestFor(PrecisionCosts costs, int bits)
    {
        ArgumentNullException.ThrowIfNull(costs);
        var alone = costs.Routes.FirstOrDefault(r => r.Bits == bits && r.DraftBits is null)
            ?? throw new ArgumentException($"no measured cost for {bits} bits: the costs cover {costs.Routes.Min(r => r.Bits)}..{costs.Routes.Max(r => r.Bits)} bits.");
        var pair = costs.Routes.Where(r => r.Bits == bits && r.DraftBits is not null).MinBy(r => r.MsPerToken);
        return pair is not null && pair.MsPerToken < alone.MsPerToken
            ? new RouteDecision(pair, null, $"{Describe(pair)} takes {pair.MsPerToken:0.###} ms per token against {alone.MsPerToken:0.###} ms alone")
            : new RouteDecision(alone, null, $"{bits} bits alone takes {alone.MsPerToken:0.###} ms per token" +
                (pair is null ? "; no narrower draft width" : $"; its fastest pair, {Describe(pair)}, takes {pair.MsPerToken:0.###} ms"));
    }

    private static string Describe(RouteCost r) => r.DraftBits is int d ? $"{r.Bits} bits drafted at {d} (k = {r.DraftTokens})" : $"{r.Bits} bits";

    /// <summary>Milliseconds of <paramref name="run"/>, the faster of two timed runs after an untimed one.</summary>
    private static double Time(Action run)
    {
        run();
        double best = double.MaxValue;
        for (int i = 0; i < 2; i++)
        {
            long start = Stopwatch.GetTimestamp();
            run();
            best = Math.Min(best, Stopwatch.GetElapsedTime(start).TotalMilliseconds);
        }
        return best;
    }
}
