using System.CommandLine;
using System.Diagnostics;
using System.Numerics.Tensors;
using AnyPrecML.Kernels;
using AnyPrecML.Models;
using AnyPrecML.Onnx;
using AnyPrecML.Quantization;

namespace AnyPrecML.Cli;

/// <summary>
/// `anyprec bench batch`: decode of B sequences stepped together (<see cref="IAnyPrecisionEngine.ForwardBatch"/>, what
/// `serve` runs for concurrent requests) at each width: milliseconds per pass, tokens/s over all sequences, and the
/// gain over one sequence. Each linear reads its planes once per pass, so the gain is largest where a pass is bound by
/// reading and decoding planes (wide b, or AVX2's table lookups).
/// </summary>
internal static class BenchBatchCommand
{
    public static Command Create()
    {
        var model = new Option<string>("--model", "-m") { Description = "An any-precision model directory.", Required = true };
        var bitsOption = new Option<int[]>("--bits") { Description = "Widths to measure (default: the seed and the parent width).", AllowMultipleArgumentsPerToken = true };
        var batches = new Option<int[]>("--batch") { Description = "Sequences stepped together.", DefaultValueFactory = _ => [1, 2, 4, 8, 16], AllowMultipleArgumentsPerToken = true };
        var steps = new Option<int>("--tokens", "-n") { Description = "Decode passes timed per width and batch.", DefaultValueFactory = _ => 16 };
        var context = new Option<int>("--context") { Description = "Tokens each sequence holds before the timed passes (a prompt of its own).", DefaultValueFactory = _ => 16 };
        var rounds = new Option<int>("--rounds") { Description = "Timings per width and batch, taken round-robin over them all, the median kept (a drifting machine's phases then fall on all alike).", DefaultValueFactory = _ => 3 };
        var accuracy = CommonOptions.Accuracy();
        var kvCache = CommonOptions.KvCache();
        var json = CommonOptions.Json();
        var command = new Command("batch", "Decode tokens/s of several sequences stepped together at each width (what serve runs for concurrent requests) against one sequence.")
        {
            model, bitsOption, batches, steps, context, rounds, accuracy, kvCache, json,
        };
        command.SetAction((r, ct) =>
        {
            int[] sizes = r.GetValue(batches)!;
            if (sizes.Length == 0 || sizes.Any(b => b < 1)) throw new ArgumentException("--batch must list sizes of 1 or more.");
            if (r.GetValue(steps) < 1) throw new ArgumentException("--tokens must be 1 or more.");
            if (r.GetValue(rounds) < 1) throw new ArgumentException("--rounds must be 1 or more.");
            using var ap = AnyPrecisionModel.Open(r.GetValue(model)!);
            var c = ap.Config;
            int n = r.GetValue(steps), prompt = r.GetValue(context);
            if (prompt < 1 || prompt + n + 2 > c.MaxSeqLen) throw new ArgumentException($"--context {prompt} and {n} passes do not fit the model's context of {c.MaxSeqLen} tokens.");
            int[] widths = r.GetValue(bitsOption) is { Length: > 0 } chosen ? chosen.Select(ap.CheckBits).ToArray() : [ap.SeedBits, ap.ParentBits];
            var backend = CommonOptions.Backend(r.GetValue(accuracy)) ?? BitplaneBackend.Default;
            using var engine = new OnnxEngine(ap, new OnnxEngineOptions { Backend = backend, KvCacheType = CommonOptions.CacheType(r.GetValue(kvCache)) });
            r.Err().WriteLine($"{c.Layers} layers, dim {c.Dim}, {c.ParameterCount / 1e6:F1}M parameters; {engine.Kernels}; {n} passes after {prompt} tokens each");
            // Warm-up: every batch size once, so no timing below includes JIT compilation or a first table build.
            foreach (int size in sizes) PassMs(engine, widths[0], size, prompt, 2);
            int measurements = r.GetValue(rounds) * widths.Length * sizes.Length, done = 0;
            var progress = new ConsoleProgress<int>(r.Err(), "bench batch", d => (d, measurements), "measurements");
            var times = new List<double>[widths.Length, sizes.Length];
            for (int round = 0; round < r.GetValue(rounds); round++)
                for (int wi = 0; wi < widths.Length; wi++)
                    for (int si = 0; si < sizes.Length; si++)
                    {
                        ct.ThrowIfCancellationRequested();
                        (times[wi, si] ??= []).Add(PassMs(engine, widths[wi], sizes[si], prompt, n));
                        progress.Report(++done);
                    }
            var rows = new List<Row>();
            for (int wi = 0; wi < widths.Length; wi++)
            {
                double single = Median(times[wi, 0]) / sizes[0];
                for (int si = 0; si < sizes.Length; si++)
                {
                    double ms = Median(times[wi, si]);
                    rows.Add(new Row(widths[wi], sizes[si], Math.Round(ms, 2), Math.Round(sizes[si] * 1000 / ms, 1), Math.Round(1000 / ms, 1), Math.Round(single * sizes[si] / ms, 2)));
                }
            }
            if (r.GetValue(json))
            {
                r.WriteJson(new { kernels = engine.Kernels, passes = n, context = prompt, rows = rows.Select(x => new { bits = x.Bits, batch = x.Batch, ms_per_pass = x.MsPerPass, tokens_per_second = x.TokensPerSecond, tokens_per_second_per_sequence = x.TokensPerSecondPerSequence, gain = x.Gain }) });
                return Task.FromResult(0);
            }
            var o = r.Out();
            o.WriteLine($"| bits | sequences | ms per pass | tok/s (all) | tok/s per sequence | gain over {sizes[0]} |\n|---:|---:|---:|---:|---:|---:|");
            foreach (var x in rows) o.WriteLine($"| {x.Bits} | {x.Batch} | {x.MsPerPass} | {x.TokensPerSecond} | {x.TokensPerSecondPerSequence} | {x.Gain}x |");
            return Task.FromResult(0);
        });
        return command;
    }

    private static double Median(List<double> values)
    {
        var sorted = values.Order().ToList();
        return sorted[sorted.Count / 2];
    }

    /// <summary>One measurement; Gain is the tokens/s over all sequences against the first batch size's per sequence.</summary>
    private sealed record Row(int Bits, int Batch, double MsPerPass, double TokensPerSecond, double TokensPerSecondPerSequence, double Gain);

    /// <summary>Median milliseconds of one pass over <paramref name="size"/> sequences (each after its own prompt), greedy tokens fed back.</summary>
    private static double PassMs(OnnxEngine engine, int bits, int size, int prompt, int passes)
    {
        var c = engine.Config;
        var caches = new KvCache[size];
        var tokens = new int[size];
        var logits = new float[size * c.VocabSize];
        for (int i = 0; i < size; i++)
        {
            caches[i] = engine.CreateCache(prompt + passes + 4);
            // Different prompts: each sequence attends to its own context, as concurrent requests do.
            var ids = Enumerable.Range(0, prompt).Select(t => t == 0 ? c.BosTokenId : (int)(((uint)(t + 131 * i) * 2654435761u) % (uint)c.VocabSize)).ToArray();
            engine.Forward(ids.AsSpan(0, prompt - 1), caches[i], new float[c.VocabSize], bits);
            tokens[i] = ids[^1];
        }
        var times = new List<double>();
        for (int step = -2; step < passes; step++) // two warm-up passes (the pool's threads awake, the caches warm)
        {
            long start = Stopwatch.GetTimestamp();
            if (size == 1) engine.Forward(tokens, caches[0], logits, bits);
            else engine.ForwardBatch(tokens, caches, logits, bits);
            if (step >= 0) times.Add(Stopwatch.GetElapsedTime(start).TotalMilliseconds);
            for (int i = 0; i < size; i++) tokens[i] = TensorPrimitives.IndexOfMax(logits.AsSpan(i * c.VocabSize, c.VocabSize));
        }
        times.Sort();
        return times[times.Count / 2];
    }
}
