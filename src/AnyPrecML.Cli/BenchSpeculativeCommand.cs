using System.CommandLine;
using System.Diagnostics;
using AnyPrecML.Generation;
using AnyPrecML.Models;

namespace AnyPrecML.Cli;

/// <summary>
/// `anyprec bench speculative`: greedy self-speculative decoding for every draft width below each target and every
/// draft length k, beside target-only decoding of the same prompts, in one process: acceptance rate, tokens per target
/// pass, tokens/s and whether the output is unchanged; then the fastest (d, k) per target.
/// </summary>
internal static class BenchSpeculativeCommand
{
    private static readonly string[] DefaultPrompts =
    [
        "Once upon a time", "Lily and Tom went to the", "The little dog saw a", "One day, a girl named",
        "Tim had a big red", "The sun was shining and", "Mom said to Ben,", "There was a small bird",
    ];

    public static Command Create()
    {
        var model = new Option<string>("--model", "-m") { Description = "An any-precision model directory.", Required = true };
        var tokenizer = CommonOptions.Tokenizer();
        var engine = CommonOptions.Engine();
        var accuracy = CommonOptions.Accuracy();
        var kvCache = CommonOptions.KvCache();
        var text = new Option<string?>("--text") { Description = "Prompts: the first words of each line of this file (default: eight story openings)." };
        var prompts = new Option<int>("--prompts") { Description = "Prompts to decode from.", DefaultValueFactory = _ => 8 };
        var tokens = new Option<int>("--tokens", "-n") { Description = "Tokens generated per prompt.", DefaultValueFactory = _ => 128 };
        var targets = new Option<int[]>("--targets") { Description = "Target widths (default: the parent width).", AllowMultipleArgumentsPerToken = true };
        var drafts = new Option<int[]>("--drafts") { Description = "Draft widths (default: seed..target-1).", AllowMultipleArgumentsPerToken = true };
        var ks = new Option<int[]>("--draft-tokens") { Description = "Draft lengths k.", DefaultValueFactory = _ => [1, 2, 4, 8], AllowMultipleArgumentsPerToken = true };
        var acceptance = new Option<string[]>("--acceptance")
        {
            Description = "Cost model: acceptance per draft width measured on real weights (e.g. 3=0.68 4=0.88 5=0.95), combined with this model's measured pass times (for synthetic weights, whose own acceptance means nothing).",
            AllowMultipleArgumentsPerToken = true,
        };
        var json = CommonOptions.Json();
        var command = new Command("speculative", "Self-speculative decoding: acceptance, tokens per target pass and tokens/s per (draft, target, k) beside target-only; best (d, k) per target.")
        {
            model, tokenizer, engine, accuracy, kvCache, text, prompts, tokens, targets, drafts, ks, acceptance, json,
        };
        command.SetAction((r, ct) =>
        {
            // The engine line names the kernels that ran (path, instruction set, arithmetic): pass times depend on them.
            using var m = CommonOptions.Load(r.GetValue(model)!, r.GetValue(tokenizer), null, r.GetValue(engine), r.GetValue(accuracy), log: r.Err(), kvCache: r.GetValue(kvCache));
            if (m.Engine is not IAnyPrecisionEngine e) throw new ArgumentException($"'{r.GetValue(model)}' is not an any-precision model (quantize it with `anyprec quantize`).");
            var c = e.Config;
            int n = r.GetValue(tokens), count = r.GetValue(prompts);
            if (n < 1 || count < 1) throw new ArgumentException("--tokens and --prompts must be positive.");
            var lines = r.GetValue(text) is { } path ? File.ReadLines(path).Where(l => l.Trim().Length > 0).Take(count).Select(l => string.Join(' ', l.Split(' ', StringSplitOptions.RemoveEmptyEntries).Take(6)))
                : DefaultPrompts.Take(count);
            var ids = lines.Select(l => { List<int> x = [.. m.Tokenizer.EncodeToIds(l)]; if (x.Count == 0 || x[0] != c.BosTokenId) x.Insert(0, c.BosTokenId); return x.ToArray(); }).ToList();
            if (ids.Count == 0) throw new ArgumentException("no prompts: the text has no non-empty line.");
            if (ids.Max(p => p.Length) + n + 64 > c.MaxSeqLen) throw new ArgumentException($"--tokens {n} and the prompts do not fit the model's context of {c.MaxSeqLen}.");
            int[] targetWidths = r.GetValue(targets) is { Length: > 0 } tw ? tw : [e.ParentBits];
            foreach (int t in targetWidths)
                if (t <= e.SeedBits || t > e.ParentBits) throw new ArgumentException($"target width {t} must be in {e.SeedBits + 1}..{e.ParentBits}.");
            int[] kValues = r.GetValue(ks)!;
            foreach (int k in kValues)
                if (k is < 1 or > 64) throw new ArgumentException($"draft length {k} must be in 1..64.");
            var alphas = ParseAcceptance(r.GetValue(acceptance) ?? []).ToList();
            var err = r.Err();
            err.WriteLine($"{c.Layers} layers, dim {c.Dim}, {c.ParameterCount / 1e6:F2}M parameters; {ids.Count} prompts x {n} tokens, greedy");

            // Warm-up: JIT every path once, untimed.
            SpeculativeGenerator.TargetOnlyGreedy(e, targetWidths[0], ids[0], Math.Min(n, 8));
            SpeculativeGenerator.Greedy(e, e.SeedBits, targetWidths[0], kValues[0], ids[0], Math.Min(n, 8));
            BenchTiming.SettleJit();

            var rows = new List<Row>();
            var best = new List<object>();
            int[] DraftWidths(int t) => r.GetValue(drafts) is { Length: > 0 } dw ? dw.Where(d => d >= e.SeedBits && d < t).ToArray() : Enumerable.Range(e.SeedBits, t - e.SeedBits).ToArray();
            int runs = 0;
            var progress = new ConsoleProgress<int>(err, "bench speculative", done => (done, targetWidths.Sum(t => 1 + DraftWidths(t).Length * kValues.Length)), "runs");
            foreach (int t in targetWidths)
            {
                var plainSw = Stopwatch.StartNew();
                var expected = ids.Select(p => SpeculativeGenerator.TargetOnlyGreedy(e, t, p, n)).ToList();
                double plainTps = ids.Count * n / plainSw.Elapsed.TotalSeconds;
                progress.Report(++runs);
                progress.Line($"t={t}: target-only {plainTps:F1} tok/s");
                Row? top = null;
                foreach (int d in DraftWidths(t))
                    foreach (int k in kValues)
                    {
                        ct.ThrowIfCancellationRequested();
                        long drafted = 0, accepted = 0, rejected = 0, steps = 0;
                        bool same = true;
                        var sw = Stopwatch.StartNew();
                        for (int i = 0; i < ids.Count; i++)
                        {
                            var (output, s) = SpeculativeGenerator.Greedy(e, d, t, k, ids[i], n);
                            same &= output.SequenceEqual(expected[i]);
                            drafted += s.Drafted; accepted += s.Accepted; rejected += s.Rejected; steps += s.TargetSteps;
                        }
                        double tps = ids.Count * n / sw.Elapsed.TotalSeconds;
                        var row = new Row(t, d, k, Math.Round((double)accepted / (accepted + rejected), 4), Math.Round((double)accepted / drafted, 4), Math.Round((double)ids.Count * n / steps, 3),
                            Math.Round(tps, 1), Math.Round(plainTps, 1), Math.Round(tps / plainTps, 3), same);
                        rows.Add(row);
                        progress.Report(++runs);
                        progress.Line($"  d={d} k={k}: acceptance {row.acceptance_rate:P1}, {row.tokens_per_target_step} tokens/target step, {row.tokens_per_second} tok/s ({row.speedup}x){(same ? "" : ", OUTPUT DIFFERS")}");
                        if (same && (top is null || row.tokens_per_second > top.tokens_per_second)) top = row;
                    }
                if (top is not null) best.Add(new { target_bits = t, draft_bits = top.draft_bits, draft_tokens = top.draft_tokens, speedup = top.speedup });
            }

            var modelRows = new List<ModelRow>();
            foreach (var (d, alpha) in alphas)
                foreach (int t in targetWidths.Where(t => t > d))
                {
                    double draftMs = PassMs(e, d, 1), targetMs = PassMs(e, t, 1);
                    foreach (int k in kValues)
                    {
                        // Leviathan et al.: with each draft kept with chance α, a round of k drafts yields (1 − α^(k+1)) / (1 − α) tokens.
                        double verifyMs = PassMs(e, t, k + 1), perRound = alpha < 1 ? (1 - Math.Pow(alpha, k + 1)) / (1 - alpha) : k + 1;
                        double tps = 1000 * perRound / (k * draftMs + verifyMs), plain = 1000 / targetMs;
                        modelRows.Add(new ModelRow(t, d, k, alpha, Math.Round(draftMs, 3), Math.Round(verifyMs, 3), Math.Round(targetMs, 3), Math.Round(perRound, 3),
                            Math.Round(tps, 2), Math.Round(plain, 2), Math.Round(tps / plain, 3)));
                        err.WriteLine($"  model t={t} d={d} k={k}: draft {draftMs:F2} ms, verify {verifyMs:F2} ms, target {targetMs:F2} ms per pass; {perRound:F2} tokens/round -> {tps:F2} tok/s vs {plain:F2} ({tps / plain:F2}x)");
                    }
                }

            var result = new { model = Path.GetFileName(Path.GetFullPath(r.GetValue(model)!)), engine = e.GetType().Name, kernels = e.Kernels, prompts = ids.Count, tokens = n, rows, best, model_rows = modelRows };
            if (r.GetValue(json)) { r.WriteJson(result); return Task.FromResult(0); }
            var o = r.Out();
            o.WriteLine("| target | draft | k | acceptance | drafts kept | tokens / target step | tok/s | target-only tok/s | speedup | output unchanged |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
            foreach (var x in rows)
                o.WriteLine($"| {x.target_bits} | {x.draft_bits} | {x.draft_tokens} | {x.acceptance_rate:P1} | {x.drafts_kept:P1} | {x.tokens_per_target_step:F2} | {x.tokens_per_second} | {x.target_only_tokens_per_second} | {x.speedup:F2}x | {(x.same_output ? "yes" : "NO")} |");
            foreach (var x in rows.GroupBy(x => x.target_bits))
            {
                var top = x.Where(y => y.same_output).MaxBy(y => y.tokens_per_second);
                o.WriteLine(top is null ? $"t={x.Key}: no configuration kept the output unchanged"
                    : $"best for t={x.Key}: d={top.draft_bits}, k={top.draft_tokens}: {top.tokens_per_second} tok/s, {top.speedup:F2}x target-only ({top.acceptance_rate:P0} accepted, {top.tokens_per_target_step:F2} tokens per target step)");
            }
            if (modelRows.Count > 0)
            {
                o.WriteLine("\nCost model (acceptance given, pass times measured here):\n| target | draft | k | acceptance | draft ms/pass | verify ms/pass (k+1) | target-only ms/token | tokens/round | modeled tok/s | target-only tok/s | modeled speedup |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
                foreach (var x in modelRows)
                    o.WriteLine($"| {x.target_bits} | {x.draft_bits} | {x.draft_tokens} | {x.acceptance:P0} | {x.draft_ms} | {x.verify_ms} | {x.target_ms} | {x.tokens_per_round} | {x.tokens_per_second} | {x.target_only_tokens_per_second} | {x.speedup:F2}x |");
            }
            return Task.FromResult(0);
        });
        return command;
    }

    private sealed record ModelRow(int target_bits, int draft_bits, int draft_tokens, double acceptance, double draft_ms, double verify_ms, double target_ms,
        double tokens_per_round, double tokens_per_second, double target_only_tokens_per_second, double speedup);

    /// <summary>"d=α" pairs: a draft width and the chance a target keeps its tokens.</summary>
    private static IEnumerable<(int Draft, double Alpha)> ParseAcceptance(string[] values)
    {
        foreach (var v in values)
        {
            var parts = v.Split('=');
            if (parts.Length != 2 || !int.TryParse(parts[0], out int d) || !double.TryParse(parts[1], System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out double a) || !(a >= 0 && a <= 1))
                throw new ArgumentException($"--acceptance '{v}' must be draftbits=rate with a rate in [0, 1], e.g. 4=0.88.");
            yield return (d, a);
        }
    }

    /// <summary>Median milliseconds of one forward pass of <paramref name="positions"/> tokens at <paramref name="bits"/> after a 32-token context, rolled back after each pass.</summary>
    private static double PassMs(IAnyPrecisionEngine e, int bits, int positions)
    {
        var c = e.Config;
        const int Context = 32;
        var cache = e.CreateCache(Context + positions);
        var prefix = Enumerable.Range(0, Context).Select(i => i == 0 ? c.BosTokenId : (7 * i + 3) % c.VocabSize).ToArray();
        e.Forward(prefix, cache, new float[c.VocabSize], bits);
        var tokens = Enumerable.Range(0, positions).Select(i => (11 * i + 5) % c.VocabSize).ToArray();
        var logits = new float[positions * c.VocabSize];
        return BenchTiming.MedianMs(() => { e.Forward(tokens, cache, logits, bits); cache.Truncate(Context); });
    }

    private sealed record Row(int target_bits, int draft_bits, int draft_tokens, double acceptance_rate, double drafts_kept, double tokens_per_target_step,
        double tokens_per_second, double target_only_tokens_per_second, double speedup, bool same_output);
}
