using System.CommandLine;
using System.Diagnostics;
using AnyPrecML.Models;
using AnyPrecML.Quantization;

namespace AnyPrecML.Cli;

/// <summary>`anyprec bench`: measured figures for docs/BENCHMARKS.md and docs/QUALITY.md.</summary>
internal static class BenchCommand
{
    public static Command Create() => new("bench", "Benchmarks: quantization speed, k-means quality on a real row, format memory, Fisher, kernels, the ONNX engine, batched decode, the OpenAI server, a growing chat, speculative decoding, the GPU kernel.")
    {
        Quantize(), KMeans(), Memory(), Fisher(), BenchKernelsCommand.Create(), BenchEngineCommand.Create(), BenchBatchCommand.Create(), BenchServeCommand.Create(), BenchChatCommand.Create(), BenchSpeculativeCommand.Create(), BenchGpuCommand.Create(),
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
            var progress = ConsoleProgress.Steps(r.Err(), "fisher", "sequences");
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
        var seedMethod = QuantizeCommand.SeedMethodOption();
        var bf16 = new Option<bool>("--bf16") { Description = "Round the weights to bfloat16 first, as real checkpoints store them (rows then hold far fewer distinct values)." };
        var json = CommonOptions.Json();
        var command = new Command("quantize", "Seconds to quantize one synthetic matrix (N(0, 0.02²) weights, uniform sensitivity) from seed to parent.")
        {
            rows, cols, threads, seedBits, parentBits, seedMethod, bf16, json,
        };
        command.SetAction(r =>
        {
            int R = r.GetValue(rows), C = r.GetValue(cols), seed = r.GetValue(seedBits), parent = r.GetValue(parentBits);
            var method = QuantizeCommand.ParseSeedMethod(r.GetValue(seedMethod));
            new QuantizerOptions { SeedBits = seed, ParentBits = parent }.Validated();
            var rng = new Random(1);
            var w = new float[(long)R * C];
            for (long i = 0; i < w.Length; i++) w[i] = (float)(Math.Sqrt(-2 * Math.Log(1 - rng.NextDouble())) * Math.Cos(2 * Math.PI * rng.NextDouble()) * 0.02);
            if (r.GetValue(bf16)) for (long i = 0; i < w.Length; i++) w[i] = BitConverter.UInt32BitsToSingle((uint)TensorEncoding.ToBFloat16(w[i]) << 16);
            var ones = Enumerable.Repeat(1f, C).ToArray();
            var results = new RowQuantization[R];
            var progress = new ConsoleProgress<long>(r.Err(), "bench quantize", done => (done, R), "rows");
            long rowsDone = 0;
            var sw = Stopwatch.StartNew();
            Parallel.For(0, R, new ParallelOptions { MaxDegreeOfParallelism = r.GetValue(threads) }, i =>
            {
                results[i] = RowQuantizer.Quantize(w.AsSpan((int)((long)i * C), C), ones, seed, parent, (ulong)i, method);
                progress.Report(Interlocked.Increment(ref rowsDone));
            });
            double seconds = sw.Elapsed.TotalSeconds;
            if (r.GetValue(json)) r.WriteJson(new { rows = R, cols = C, threads = r.GetValue(threads), seed_bits = seed, parent_bits = parent, seed_method = r.GetValue(seedMethod), bf16 = r.GetValue(bf16), seconds = Math.Round(seconds, 3) });
            else r.Out().WriteLine($"{R}x{C}, {seed}->{parent} bits, {r.GetValue(seedMethod)} seed{(r.GetValue(bf16) ? ", bf16" : "")}, {r.GetValue(threads)} thread(s): {seconds:F2} s ({seconds / R * 1e6:F0} us/row)");
            return 0;
        });
        return command;
    }

    private static Command KMeans()
    {
        var row = new Option<string?>("--row") { Description = "Raw little-endian float32 weights of one row." };
        var weightsFile = new Option<string?>("--weights") { Description = "Raw float32 sensitivities of --row (default: χ²(1) draws with a fixed seed, heavy-tailed like squared gradients)." };
        var model = new Option<string?>("--model", "-m") { Description = "Instead of --row: every row of every block linear of this model." };
        var tokenizer = CommonOptions.Tokenizer();
        var sensitivity = QuantizeCommand.Sensitivity();
        sensitivity.AcceptOnlyFromAmong(SensitivitySources.Kinds);
        var calibration = new Option<string?>("--calibration") { Description = "Calibration text for --model with fisher or hessian (one document per line)." };
        var samples = QuantizeCommand.Samples();
        var seqLen = QuantizeCommand.SeqLen();
        var seedBits = new Option<int>("--seed-bits") { DefaultValueFactory = _ => 3 };
        var parentBits = new Option<int>("--parent-bits") { DefaultValueFactory = _ => 8 };
        var json = CommonOptions.Json();
        var command = new Command("kmeans", "Weighted and unweighted objective Σ w (x − q)², summed over rows, at each b: the any-precision parent from the exact seed and from the k-means++ seed, against each width clustered on its own (exact and k-means++).")
        {
            row, weightsFile, model, tokenizer, sensitivity, calibration, samples, seqLen, seedBits, parentBits, json,
        };
        command.SetAction((r, ct) =>
        {
            int seed = r.GetValue(seedBits), parent = r.GetValue(parentBits);
            new QuantizerOptions { SeedBits = seed, ParentBits = parent }.Validated();
            // Each job: the rows of one matrix with their weighted sensitivities; unweighted runs use ones.
            var jobs = new List<(float[] Values, int Cols, Func<int, float[]> Weights)>();
            string weightedKind;
            if (r.GetValue(row) is { } rowPath)
            {
                var v = ReadFloats(rowPath);
                float[] w;
                if (r.GetValue(weightsFile) is { } wPath)
                {
                    w = ReadFloats(wPath);
                    if (w.Length != v.Length) throw new ArgumentException($"--weights has {w.Length} values for a row of {v.Length}.");
                    weightedKind = Path.GetFileName(wPath);
                }
                else
                {
                    var rng = new Random(0);
                    w = new float[v.Length];
                    for (int j = 0; j < w.Length; j++) { double g = Math.Sqrt(-2 * Math.Log(1 - rng.NextDouble())) * Math.Cos(2 * Math.PI * rng.NextDouble()); w[j] = (float)(g * g); }
                    weightedKind = "chi2(1) random";
                }
                jobs.Add((v, v.Length, _ => w));
            }
            else if (r.GetValue(model) is { } modelPath)
            {
                using var source = LlamaCheckpoint.Open(modelPath);
                var (sens, _) = QuantizeCommand.CreateSensitivity(r, source, r.GetValue(sensitivity)!, r.GetValue(calibration), r.GetValue(tokenizer), r.GetValue(samples), r.GetValue(seqLen), ct);
                weightedKind = sens.Kind;
                for (int l = 0; l < source.Config.Layers; l++)
                    foreach (var part in LlamaTensorNames.BlockLinears)
                    {
                        var shape = LlamaTensorNames.ShapeOf(source.Config, part);
                        int rows = (int)shape[0], cols = (int)shape[1];
                        var s = AnyPrecisionQuantizer.SensitivityInHfOrder(source.Config, part, sens.For(l, part, rows, cols));
                        jobs.Add((AnyPrecisionQuantizer.SourceWeight(source, l, part), cols, i => s.Row(i).ToArray()));
                    }
            }
            else throw new ArgumentException("give --row FILE or --model PATH.");

            int widths = parent - seed + 1;
            var results = new List<object>();
            var text = new System.Text.StringBuilder();
            long rowsDone = 0, rowsTotal = 2 * jobs.Sum(j => (long)(j.Values.Length / j.Cols));
            var progress = new ConsoleProgress<long>(r.Err(), "bench kmeans", done => (done, rowsTotal), "rows");
            foreach (bool weighted in new[] { false, true })
            {
                // [b - seed]: any-precision from the exact seed, from the k-means seed; independent exact, independent k-means.
                var sums = new double[widths, 4];
                var gate = new object();
                foreach (var (values, cols, weightsOf) in jobs)
                {
                    int rows = values.Length / cols;
                    Parallel.For(0, rows, i =>
                    {
                        var v = values.AsSpan(i * cols, cols);
                        var w = weighted ? weightsOf(i) : Enumerable.Repeat(1f, cols).ToArray();
                        var local = new double[widths, 4];
                        var exact = RowQuantizer.Quantize(v, w, seed, parent, (ulong)i, SeedMethod.Exact);
                        var kmeans = RowQuantizer.Quantize(v, w, seed, parent, (ulong)i, SeedMethod.KMeans);
                        for (int b = seed; b <= parent; b++)
                        {
                            local[b - seed, 0] = exact.Error(v, w, b);
                            local[b - seed, 1] = kmeans.Error(v, w, b);
                            local[b - seed, 2] = Independent(v, w, b, SeedMethod.Exact, (ulong)i);
                            local[b - seed, 3] = Independent(v, w, b, SeedMethod.KMeans, (ulong)i);
                        }
                        lock (gate) for (int b = 0; b < widths; b++) for (int k = 0; k < 4; k++) sums[b, k] += local[b, k];
                        progress.Report(Interlocked.Increment(ref rowsDone));
                    });
                }
                string label = weighted ? $"weighted ({weightedKind})" : "unweighted";
                text.AppendLine($"{label}, Σ w (x − q)² over {jobs.Sum(j => j.Values.Length / j.Cols)} row(s):");
                text.AppendLine("| bits | AP exact seed | AP k-means seed | independent exact | independent k-means | AP exact / independent exact | AP exact / AP k-means |");
                text.AppendLine("|---:|---:|---:|---:|---:|---:|---:|");
                for (int b = seed; b <= parent; b++)
                {
                    int i = b - seed;
                    text.AppendLine(System.FormattableString.Invariant(
                        $"| {b} | {sums[i, 0]:E4} | {sums[i, 1]:E4} | {sums[i, 2]:E4} | {sums[i, 3]:E4} | {sums[i, 0] / sums[i, 2]:F4} | {sums[i, 0] / sums[i, 1]:F4} |"));
                    results.Add(new { weighted, bits = b, ap_exact = sums[i, 0], ap_kmeans = sums[i, 1], independent_exact = sums[i, 2], independent_kmeans = sums[i, 3] });
                }
            }
            if (r.GetValue(json)) r.WriteJson(new { rows = jobs.Sum(j => j.Values.Length / j.Cols), weighted_by = weightedKind, results });
            else r.Out().Write(text.ToString());
            return Task.FromResult(0);
        });
        return command;

        static double Independent(ReadOnlySpan<float> v, float[] w, int bits, SeedMethod method, ulong seed)
        {
            var (codes, centroids) = RowQuantizer.Cluster(v, w, 1 << bits, method, seed);
            double total = 0;
            for (int j = 0; j < v.Length; j++) { double e = v[j] - (double)centroids[codes[j]]; total += w[j] * e * e; }
            return total;
        }
    }

    private static float[] ReadFloats(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"'{path}' does not exist.", path);
        var bytes = File.ReadAllBytes(path);
        if (bytes.Length == 0 || bytes.Length % 4 != 0) throw new ArgumentException($"{path}: {bytes.Length} bytes is not a float32 row.");
        return System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(bytes).ToArray();
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
