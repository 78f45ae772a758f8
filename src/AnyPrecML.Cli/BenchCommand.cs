using System.CommandLine;
using System.Diagnostics;
using AnyPrecML.Models;
using AnyPrecML.Quantization;

namespace AnyPrecML.Cli;

/// <summary>`anyprec bench`: measured figures for docs/BENCHMARKS.md and docs/QUALITY.md.</summary>
internal static class BenchCommand
{
    public static Command Create() => new("bench", "Benchmarks: quantization speed, k-means quality on a real row, format memory, Fisher, kernels, the ONNX engine, speculative decoding.")
    {
        Quantize(), KMeans(), Memory(), Fisher(), BenchKernelsCommand.Create(), BenchEngineCommand.Create(), BenchSpeculativeCommand.Create(),
    };

    private static Command Fisher()
    {
        var model = CommonOptions.Model();
        var tokenizer = CommonOptions.Tokenizer();
        var calibration = new Option<string>("--calibration") { Description = "Calibration text (one document per line).", Required = true };
        var samples = QuantizeCommand.Samples();
        var seqLen = QuantizeCommand.SeqLen();
        var json = CommonOptions.Json();
        var command = new Command("fisher", "Time and peak memory of the Fisher sensitivity (one backward pass per calibration sequence).")
        {
            model, tokenizer, calibration, samples, seqLen, json,
        };
        command.SetAction((r, ct) =>
        {
            using var source = LlamaCheckpoint.Open(r.GetValue(model)!);
            var tok = Tokenization.LlamaTokenizerLoader.Load(source, r.GetValue(tokenizer));
            var set = CalibrationSet.FromText(tok, File.ReadAllText(r.GetValue(calibration)!), r.GetValue(samples), r.GetValue(seqLen), source.Config.MaxSeqLen, r.GetValue(calibration)!);
            var weights = Reference.LlamaWeights.FromCheckpoint(source);
            long before = Environment.WorkingSet;
            var sw = Stopwatch.StartNew();
            var progress = new ConsoleProgress<(int Done, int Total)>(r.Err(), "fisher", p => (p.Done, p.Total));
            var fisher = FisherSensitivity.Collect(weights, set, progress, ct);
            double seconds = sw.Elapsed.TotalSeconds;
            long peak = System.Diagnostics.Process.GetCurrentProcess().PeakWorkingSet64;
            var result = new
            {
                sequences = set.Sequences.Count, tokens = set.Tokens, seconds = Math.Round(seconds, 2),
                tokens_per_second = Math.Round(set.Tokens / seconds, 1), mean_loss = Math.Round(fisher.MeanLoss, 4),
                working_set_before_mb = before >> 20, peak_working_set_mb = peak >> 20,
            };
            if (r.GetValue(json)) r.WriteJson(result);
            else r.Out().WriteLine($"{result.sequences} sequences, {result.tokens} tokens: {seconds:F1} s ({result.tokens_per_second} tokens/s), mean loss {fisher.MeanLoss:F3}; working set {result.working_set_before_mb} MB with the weights loaded, peak {result.peak_working_set_mb} MB");
            return Task.FromResult(0);
        });
        return command;
    }

    private static Command Quantize()
    {
        var rows = new Option<int>("--rows") { DefaultValueFactory = _ => 11008, Description = "Rows of the synthetic matrix." };
        var cols = new Option<int>("--cols") { DefaultValueFactory = _ => 4096, Description = "Columns of the synthetic matrix." };
        var threads = new Option<int>("--threads") { DefaultValueFactory = _ => 1, Description = "Threads." };
        var seedBits = new Option<int>("--seed-bits") { DefaultValueFactory = _ => 3 };
        var parentBits = new Option<int>("--parent-bits") { DefaultValueFactory = _ => 8 };
        var json = CommonOptions.Json();
        var command = new Command("quantize", "Seconds to quantize one synthetic matrix (N(0, 0.02²) weights, uniform sensitivity) from seed to parent.")
        {
            rows, cols, threads, seedBits, parentBits, json,
        };
        command.SetAction(r =>
        {
            int R = r.GetValue(rows), C = r.GetValue(cols), seed = r.GetValue(seedBits), parent = r.GetValue(parentBits);
            new QuantizerOptions { SeedBits = seed, ParentBits = parent }.Validated();
            var rng = new Random(1);
            var w = new float[(long)R * C];
            for (long i = 0; i < w.Length; i++) w[i] = (float)(Math.Sqrt(-2 * Math.Log(1 - rng.NextDouble())) * Math.Cos(2 * Math.PI * rng.NextDouble()) * 0.02);
            var ones = Enumerable.Repeat(1f, C).ToArray();
            var results = new RowQuantization[R];
            var sw = Stopwatch.StartNew();
            Parallel.For(0, R, new ParallelOptions { MaxDegreeOfParallelism = r.GetValue(threads) }, i =>
                results[i] = RowQuantizer.Quantize(w.AsSpan((int)((long)i * C), C), ones, seed, parent, (ulong)i));
            double seconds = sw.Elapsed.TotalSeconds;
            if (r.GetValue(json)) r.WriteJson(new { rows = R, cols = C, threads = r.GetValue(threads), seed_bits = seed, parent_bits = parent, seconds = Math.Round(seconds, 3) });
            else r.Out().WriteLine($"{R}x{C}, {seed}->{parent} bits, {r.GetValue(threads)} thread(s): {seconds:F2} s ({seconds / R * 1e6:F0} us/row)");
            return 0;
        });
        return command;
    }

    private static Command KMeans()
    {
        var row = new Option<string>("--row") { Description = "Raw little-endian float32 weights of one row.", Required = true };
        var json = CommonOptions.Json();
        var command = new Command("kmeans", "Weighted-MSE of the upscaled seed-3 parent at each b against k-means run directly at b (uniform weights).") { row, json };
        command.SetAction(r =>
        {
            var bytes = File.ReadAllBytes(r.GetValue(row)!);
            if (bytes.Length == 0 || bytes.Length % 4 != 0) throw new ArgumentException($"{r.GetValue(row)}: {bytes.Length} bytes is not a float32 row.");
            var v = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(bytes).ToArray();
            var w = Enumerable.Repeat(1f, v.Length).ToArray();
            var q = RowQuantizer.Quantize(v, w, 3, 8, 0);
            var results = new List<object>();
            if (!r.GetValue(json)) r.Out().WriteLine("| bits | upscaled MSE | independent MSE | upscaled / independent |\n|---:|---:|---:|---:|");
            for (int b = 3; b <= 8; b++)
            {
                int shift = 8 - b;
                double up = v.Select((x, j) => Sq(x - q.Table(b)[q.Codes[j] >> shift])).Average();
                var (codes, centroids) = RowQuantizer.KMeans(v, w, 1 << b, 0);
                double ind = v.Select((x, j) => Sq(x - centroids[codes[j]])).Average();
                results.Add(new { bits = b, upscaled = up, independent = ind, ratio = up / ind });
                if (!r.GetValue(json)) r.Out().WriteLine($"| {b} | {up:E4} | {ind:E4} | {up / ind:F4} |");
            }
            if (r.GetValue(json)) r.WriteJson(new { elements = v.Length, rows = results });
            return 0;
        });
        return command;
        static double Sq(double d) => d * d;
    }

    private static Command Memory()
    {
        var shape = new Option<string>("--shape") { DefaultValueFactory = _ => "llama2-7b", Description = $"One of: {string.Join(", ", SyntheticModel.Shapes.Keys)}." };
        var seedBits = new Option<int>("--seed-bits") { DefaultValueFactory = _ => 3 };
        var parentBits = new Option<int>("--parent-bits") { DefaultValueFactory = _ => 8 };
        var json = CommonOptions.Json();
        var command = new Command("memory", "Bytes of the quantized linear layers: one any-precision parent against separate models at every width (from the format).") { shape, seedBits, parentBits, json };
        command.SetAction(r =>
        {
            var c = SyntheticModel.ShapeNamed(r.GetValue(shape)!);
            int seed = r.GetValue(seedBits), parent = r.GetValue(parentBits);
            new QuantizerOptions { SeedBits = seed, ParentBits = parent }.Validated();
            long Sum(Func<long, long, long> bytes) => c.Layers * LlamaTensorNames.BlockLinears.Sum(p => { var s = LlamaTensorNames.ShapeOf(c, p); return bytes(s[0], s[1]); });
            long anyPrecision = Sum((rw, cl) => AnyPrecisionModel.LayerBytes(rw, cl, seed, parent));
            var separate = Enumerable.Range(seed, parent - seed + 1).ToDictionary(b => b, b => Sum((rw, cl) => AnyPrecisionModel.LayerBytes(rw, cl, b, b)));
            long fp16 = Sum((rw, cl) => rw * cl * 2);
            if (r.GetValue(json))
            {
                r.WriteJson(new { shape = r.GetValue(shape), anyprecision = anyPrecision, separate = separate.Select(kv => new { bits = kv.Key, bytes = kv.Value }), separate_total = separate.Values.Sum(), fp16 });
                return 0;
            }
            var o = r.Out();
            o.WriteLine($"{r.GetValue(shape)} linear layers ({c.Layers} x 7):");
            o.WriteLine("| model | bytes | GiB |\n|---|---:|---:|");
            foreach (var (b, bytes) in separate) o.WriteLine($"| separate {b}-bit | {bytes:N0} | {bytes / (double)(1 << 30):F2} |");
            o.WriteLine($"| sum of separate {seed}..{parent}-bit | {separate.Values.Sum():N0} | {separate.Values.Sum() / (double)(1 << 30):F2} |");
            o.WriteLine($"| **any-precision parent {parent} (serves {seed}..{parent})** | {anyPrecision:N0} | {anyPrecision / (double)(1 << 30):F2} |");
            o.WriteLine($"| fp16 | {fp16:N0} | {fp16 / (double)(1 << 30):F2} |");
            return 0;
        });
        return command;
    }
}
