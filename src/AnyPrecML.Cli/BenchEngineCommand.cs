using System.CommandLine;
using System.Diagnostics;
using AnyPrecML.Kernels;
using AnyPrecML.Models;
using AnyPrecML.Onnx;
using AnyPrecML.Quantization;
using AnyPrecML.Reference;
using Google.Protobuf;
using Microsoft.ML.OnnxRuntime;
using Microsoft.ML.OnnxRuntime.Tensors;

namespace AnyPrecML.Cli;

/// <summary>
/// `anyprec bench engine`: decode speed of the ONNX Runtime engine against the reference engine and the kernel-only
/// lower bound at every width, the custom operator's per-call overhead, and resident memory with one width used
/// against all of them, side by side in one process.
/// </summary>
internal static class BenchEngineCommand
{
    public static Command Create()
    {
        var model = new Option<string>("--model", "-m") { Description = "An any-precision model directory.", Required = true };
        var tokens = new Option<int>("--tokens", "-n") { Description = "Decode steps timed per width.", DefaultValueFactory = _ => 64 };
        var bitsOption = new Option<int[]>("--bits") { Description = "Widths to measure (default: every width the parent serves).", AllowMultipleArgumentsPerToken = true };
        var profiles = new Option<string[]>("--profile") { Description = "Precision profiles (anyprec profile) measured too, in the same run, after the widths.", AllowMultipleArgumentsPerToken = true };
        var prefill = new Option<int>("--prefill") { Description = "Also time one prefill of a prompt this long at each width (0: skip).", DefaultValueFactory = _ => 0 };
        var depth = new Option<int>("--depth", "-d") { Description = "Decode after a context this long (as llama-bench's -d): every timed step attends to it and the steps before.", DefaultValueFactory = _ => 0 };
        var reference = new Option<bool>("--reference") { Description = "Also time the managed reference engine on each width's dequantized weights (one fp32 copy at a time: 4 bytes per weight)." };
        var rounds = new Option<int>("--rounds") { Description = "Decode timings per width, taken round-robin over the widths and profiles, the median kept (a loaded machine's drift then falls on all alike).", DefaultValueFactory = _ => 1 };
        var accuracy = CommonOptions.Accuracy();
        var kvCache = CommonOptions.KvCache();
        var json = CommonOptions.Json();
        var command = new Command("engine", "Decode (and prefill) tokens/s of the ONNX engine at every width with its kernel/rest split, the kernel-only bound, op overhead, memory with one vs all widths.")
        {
            model, tokens, bitsOption, profiles, rounds, prefill, depth, reference, accuracy, kvCache, json,
        };
        command.SetAction((r, ct) =>
        {
            var err = r.Err();
            using var ap = AnyPrecisionModel.Open(r.GetValue(model)!);
            var c = ap.Config;
            int prompt = Math.Max(0, r.GetValue(prefill));
            int steps = Math.Min(r.GetValue(tokens), c.MaxSeqLen - 8);
            if (prompt + 8 > c.MaxSeqLen) throw new ArgumentException($"--prefill {prompt} does not fit the model's context of {c.MaxSeqLen} tokens.");
            int context = r.GetValue(depth);
            if (context < 0 || context + ContextPrompt + steps > c.MaxSeqLen)
                throw new ArgumentException($"--depth {context} and {steps} decode steps do not fit the model's context of {c.MaxSeqLen} tokens.");
            var widths = r.GetValue(bitsOption) is { Length: > 0 } chosen ? chosen.Select(ap.CheckBits).ToArray() : ap.SupportedBits.ToArray();
            var backend = CommonOptions.Backend(r.GetValue(accuracy)) ?? BitplaneBackend.Default;
            using var engine = new OnnxEngine(ap, new OnnxEngineOptions { Backend = backend, KvCacheType = CommonOptions.CacheType(r.GetValue(kvCache)) });
            string cacheType = engine.KvCacheType == KvCacheType.BFloat16 ? "bf16" : "fp32";
            err.WriteLine($"{c.Layers} layers, dim {c.Dim}, {c.ParameterCount / 1e6:F1}M parameters; bitplane backend: {backend.Name}; head {(engine.Int8Head ? "int8" : "fp32")}; kv cache {cacheType}");

            // Memory first, on a fresh engine: the narrowest width alone, then every width through the same session.
            // The weights are the mapped model file, so its resident pages show what was read; private memory
            // (anonymous RSS) shows that no width made a copy. This also warms every path, so no figure below
            // includes JIT compilation.
            string dir = Path.GetFullPath(r.GetValue(model)!);
            Decode(engine, widths.Min(), Math.Min(steps, 4), out _);
            GC.Collect();
            var (fileOne, anonOne) = (MappedRss(dir), AnonRss());
            foreach (int b in widths) Decode(engine, b, Math.Min(steps, 4), out _);
            GC.Collect();
            var (fileAll, anonAll) = (MappedRss(dir), AnonRss());

            var rows = new List<Row>();
            // Every width, then every profile: a profile runs through the same engine, each linear at its own width.
            var runs = widths.Select(b => (Bits: (double)b, Profile: (string?)null, View: (IInferenceEngine)engine, Widths: PrecisionProfile.Uniform(ap, b).Widths))
                .Concat((r.GetValue(profiles) ?? []).Select(path => PrecisionProfile.Load(ap, path)).Select((p, i) =>
                    (Bits: Math.Round(p.AverageBits, 3), Profile: (string?)Path.GetFileName(r.GetValue(profiles)![i]), View: (IInferenceEngine)new ProfiledEngine(engine, p), p.Widths)))
                .ToList();
            foreach (var run in runs.Where(x => x.Profile is not null)) Decode(run.View, 0, Math.Min(steps, 4), out _); // warm-up, as the widths above
            BenchTiming.SettleJit();
            int roundCount = r.GetValue(rounds);
            if (roundCount < 1) throw new ArgumentException($"--rounds {roundCount} must be at least 1.");
            var timings = runs.Select(_ => new List<(double Tps, KernelSplit Split)>()).ToArray();
            for (int round = 0; round < roundCount; round++)
                for (int i = 0; i < runs.Count; i++)
                {
                    ct.ThrowIfCancellationRequested();
                    timings[i].Add((Decode(runs[i].View, (int)runs[i].Bits, steps, out var s, context), s));
                }
            var progress = new ConsoleProgress<int>(err, "bench engine", done => (done, runs.Count), "runs");
            for (int i = 0; i < runs.Count; i++)
            {
                var (bits, profile, view, linearWidths) = runs[i];
                int b = (int)bits;
                var (onnx, split) = timings[i].OrderBy(t => t.Tps).ElementAt(roundCount / 2); // the median round
                double kernelMsPerToken = split.KernelMs / steps, headMsPerToken = split.HeadMs / steps, attentionMsPerToken = split.AttentionMs / steps;
                double bound = 1000 / KernelOnlyMs(ap, linearWidths, backend);
                double? prefillTps = prompt > 0 ? Prefill(view, b, prompt) : null;
                double? refTps = null;
                if (r.GetValue(reference) && profile is null)
                {
                    // One dequantized copy at a time: made, timed and dropped before the next width.
                    var dense = new ReferenceEngine(ap.ToWeights(b));
                    Decode(dense, b, Math.Min(steps, 4), out _); // warm-up
                    refTps = Math.Round(Decode(dense, b, steps, out _, context), 1);
                    dense = null;
                    GC.Collect();
                }
                var row = new Row(bits, profile, Math.Round(onnx, 1), prefillTps is double p ? Math.Round(p, 1) : null, refTps, Math.Round(bound, 1), Math.Round(1000 / onnx, 3),
                    Math.Round(kernelMsPerToken, 3), Math.Round(headMsPerToken, 3), Math.Round(attentionMsPerToken, 3),
                    Math.Round(1000 / onnx - kernelMsPerToken - headMsPerToken - attentionMsPerToken, 3), split.Calls / steps);
                rows.Add(row);
                progress.Report(rows.Count);
                progress.Line($"  {profile ?? "b"}={bits}: onnx {row.onnx_tokens_per_second} tok/s (kernels {row.kernel_ms_per_token} ms + int8 head {row.head_ms_per_token} ms + attention {row.attention_ms_per_token} ms + rest {row.rest_ms_per_token} ms per token)"
                    + (prefillTps is null ? "" : $", prefill {row.prefill_tokens_per_second} tok/s")
                    + (refTps is null ? "" : $", reference {refTps} tok/s") + $", kernel-only bound {row.kernel_only_tokens_per_second} tok/s");
            }
            var (opUs, directUs) = OperatorOverhead(ap, backend);
            var result = new
            {
                model = Path.GetFileName(dir), layers = c.Layers, dim = c.Dim, parameters = c.ParameterCount,
                backend = backend.Name, head = engine.Int8Head ? "int8" : "fp32", kv_cache = cacheType, decode_steps = steps, decode_depth = context, rounds = roundCount, prefill_tokens = prompt, rows,
                op_call_us = Math.Round(opUs, 2), direct_call_us = Math.Round(directUs, 2), op_overhead_us = Math.Round(opUs - directUs, 2),
                model_file_mb = Mb(new DirectoryInfo(dir).EnumerateFiles("*.safetensors").Sum(f => f.Length)),
                seed_width_model_resident_mb = Mb(fileOne), all_widths_model_resident_mb = Mb(fileAll),
                seed_width_private_mb = Mb(anonOne), all_widths_private_mb = Mb(anonAll),
                peak_resident_mb = Mb(PeakRss()),
            };
            if (r.GetValue(json)) { r.WriteJson(result); return Task.FromResult(0); }
            var o = r.Out();
            o.WriteLine("| bits | decode tok/s | prefill tok/s | reference tok/s | kernel-only bound tok/s | kernel ms/token | int8 head ms/token | attention ms/token | rest ms/token |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
            foreach (var x in rows)
                o.WriteLine($"| {x.bits}{(x.profile is null ? "" : $" ({x.profile})")} | {x.onnx_tokens_per_second} | {x.prefill_tokens_per_second?.ToString() ?? "-"} | {x.reference_tokens_per_second?.ToString() ?? "-"} | {x.kernel_only_tokens_per_second} | {x.kernel_ms_per_token} | {x.head_ms_per_token} | {x.attention_ms_per_token} | {x.rest_ms_per_token} |");
            o.WriteLine($"BitplaneLinear through ORT {result.op_call_us} µs per call vs {result.direct_call_us} µs direct: overhead {result.op_overhead_us} µs");
            o.WriteLine($"model file {result.model_file_mb} MB: resident {result.seed_width_model_resident_mb} MB after serving {widths.Min()} bits, {result.all_widths_model_resident_mb} MB after all {widths.Length} widths; private memory {result.seed_width_private_mb} MB then {result.all_widths_private_mb} MB; peak resident {result.peak_resident_mb} MB");
            return Task.FromResult(0);
        });
        return command;
    }

    private sealed record Row(double bits, string? profile, double onnx_tokens_per_second, double? prefill_tokens_per_second, double? reference_tokens_per_second, double kernel_only_tokens_per_second,
        double onnx_ms_per_token, double kernel_ms_per_token, double head_ms_per_token, double attention_ms_per_token, double rest_ms_per_token, long kernel_calls_per_token);

    /// <summary>
    /// Decode time in the bitplane kernels, in the int8 head (0 with an fp32 head: that Gemm is in the rest) and in the
    /// attention operator (0 where GroupQueryAttention runs it: then in the rest), and bitplane calls.
    /// </summary>
    private readonly record struct KernelSplit(double KernelMs, double HeadMs, double AttentionMs, long Calls);

    /// <summary>Tokens of the prompt before the timed decode steps, past any <c>--depth</c>.</summary>
    private const int ContextPrompt = 4;

    /// <summary>
    /// Greedy decode of <paramref name="steps"/> tokens after a prompt of <paramref name="depth"/> + 4 tokens; tokens per
    /// second of the decode alone, and the kernel time and calls of those decode steps only (the prompt's are not counted).
    /// </summary>
    private static double Decode(IInferenceEngine engine, int bits, int steps, out KernelSplit split, int depth = 0)
    {
        var c = engine.Config;
        var onnx = engine as OnnxEngine ?? (engine as ProfiledEngine)?.Engine as OnnxEngine; // a profile runs at its own widths
        if (engine is OnnxEngine uniform) uniform.Bits = bits;
        var cache = engine.CreateCache(Math.Min(c.MaxSeqLen, depth + ContextPrompt + steps + 4));
        var logits = new float[c.VocabSize];
        var prompt = PromptTokens(c, depth + ContextPrompt);
        engine.Forward(prompt, cache, logits);
        long ticks0 = onnx?.Operator.KernelTicks ?? 0, head0 = onnx?.Operator.HeadTicks ?? 0, attention0 = onnx?.Operator.AttentionTicks ?? 0, calls0 = onnx?.Operator.KernelCalls ?? 0;
        var sw = Stopwatch.StartNew();
        for (int i = 0; i < steps; i++)
            engine.Forward([System.Numerics.Tensors.TensorPrimitives.IndexOfMax(logits)], cache, logits);
        double seconds = sw.Elapsed.TotalSeconds;
        split = onnx is null ? default : new KernelSplit(Stopwatch.GetElapsedTime(0, onnx.Operator.KernelTicks - ticks0).TotalMilliseconds,
            Stopwatch.GetElapsedTime(0, onnx.Operator.HeadTicks - head0).TotalMilliseconds,
            Stopwatch.GetElapsedTime(0, onnx.Operator.AttentionTicks - attention0).TotalMilliseconds, onnx.Operator.KernelCalls - calls0);
        return steps / seconds;
    }

    /// <summary>Tokens per second of one prefill of <paramref name="length"/> tokens from an empty cache (after one warm-up prefill).</summary>
    private static double Prefill(IInferenceEngine engine, int bits, int length)
    {
        var c = engine.Config;
        if (engine is OnnxEngine uniform) uniform.Bits = bits;
        var tokens = PromptTokens(c, length);
        var logits = new float[c.VocabSize];
        engine.Forward(tokens.AsSpan(0, Math.Min(length, 16)), engine.CreateCache(length + 8), logits);
        var cache = engine.CreateCache(length + 8);
        var sw = Stopwatch.StartNew();
        engine.Forward(tokens, cache, logits);
        return length / sw.Elapsed.TotalSeconds;
    }

    /// <summary>A prompt of <paramref name="length"/> tokens: BOS, then a fixed scatter over the vocabulary.</summary>
    private static int[] PromptTokens(LlamaConfig c, int length)
    {
        var tokens = new int[length];
        tokens[0] = c.BosTokenId;
        for (int i = 1; i < length; i++) tokens[i] = (int)((i * 2654435761u) % (uint)c.VocabSize);
        return tokens;
    }

    /// <summary>Milliseconds per token of the linear layers alone, run back to back by the backend (median of passes).</summary>
    private static double KernelOnlyMs(AnyPrecisionModel ap, IReadOnlyList<int> widths, BitplaneBackend backend)
    {
        var c = ap.Config;
        var layers = Enumerable.Range(0, ap.LinearCount).Select(i => ap.Linear(i)).ToArray();
        var x = new float[Math.Max(c.Dim, c.HiddenDim)];
        var y = new float[Math.Max(Math.Max(c.Dim, c.HiddenDim), c.QDim)];
        for (int i = 0; i < x.Length; i++) x[i] = MathF.Sin(i) * 0.1f;
        void Pass() { for (int i = 0; i < layers.Length; i++) backend.Multiply(layers[i], widths[i], x.AsSpan(0, layers[i].Cols), 1, y.AsSpan(0, layers[i].Rows)); }
        return BenchTiming.MedianMs(Pass);
    }

    /// <summary>One BitplaneLinear node alone in a session against the same product called directly: µs per call.</summary>
    private static (double Op, double Direct) OperatorOverhead(AnyPrecisionModel ap, BitplaneBackend backend)
    {
        var w = ap.Linear(0, "self_attn.q_proj");
        var g = new OnnxGraphBuilder("one_op");
        g.Input("x", Onnx.Proto.TensorProto.Types.DataType.Float, 1, w.Cols);
        g.Input("bits", Onnx.Proto.TensorProto.Types.DataType.Int32);
        g.Output("y", Onnx.Proto.TensorProto.Types.DataType.Float, 1, w.Rows);
        g.Node(BitplaneOperator.OpType, ["x", "bits"], ["y"], BitplaneOperator.Domain, "op", ("layer", w.Name));
        using var op = new BitplaneOperator(ap, backend);
        using var so = new SessionOptions { InterOpNumThreads = 1, IntraOpNumThreads = 1 };
        using var session = op.CreateSession(g.Build((BitplaneOperator.Domain, 1)).ToByteArray(), so);
        var x = new float[w.Cols];
        var y = new float[w.Rows];
        int[] bits = [ap.SeedBits];
        using var run = new RunOptions();
        using var xv = OrtValue.CreateTensorValueFromMemory(x, [1, w.Cols]);
        using var bv = OrtValue.CreateTensorValueFromMemory(bits, []);
        using var yv = OrtValue.CreateTensorValueFromMemory(y, [1, w.Rows]);
        string[] inputs = ["x", "bits"], outputs = ["y"];
        OrtValue[] inValues = [xv, bv], outValues = [yv];
        const int Calls = 200;
        double viaOrt = BenchTiming.MedianMs(() => { for (int i = 0; i < Calls; i++) session.Run(run, inputs, inValues, outputs, outValues); }) * 1000 / Calls;
        double direct = BenchTiming.MedianMs(() => { for (int i = 0; i < Calls; i++) backend.Multiply(w, ap.SeedBits, x, 1, y); }) * 1000 / Calls;
        return (viaOrt, direct);
    }

    private static double Mb(long bytes) => Math.Round(bytes / 1048576.0, 1);

    /// <summary>Resident bytes of the process's mappings of the .safetensors files under <paramref name="dir"/> (Linux; 0 elsewhere).</summary>
    private static long MappedRss(string dir)
    {
        if (!File.Exists("/proc/self/smaps")) return 0;
        long total = 0;
        bool inModel = false;
        foreach (var line in File.ReadLines("/proc/self/smaps"))
        {
            if (line.Length > 0 && char.IsAsciiHexDigit(line[0]) && line.Contains('-'))
                inModel = line.Contains(dir, StringComparison.Ordinal) && line.EndsWith(".safetensors", StringComparison.Ordinal);
            else if (inModel && line.StartsWith("Rss:", StringComparison.Ordinal))
                total += long.Parse(line.AsSpan(4).Trim().TrimEnd("kB").Trim(), System.Globalization.CultureInfo.InvariantCulture) * 1024;
        }
        return total;
    }

    /// <summary>The process's peak resident bytes (VmHWM on Linux; the peak working set elsewhere).</summary>
    private static long PeakRss()
    {
        if (File.Exists("/proc/self/status"))
            foreach (var line in File.ReadLines("/proc/self/status"))
                if (line.StartsWith("VmHWM:", StringComparison.Ordinal))
                    return long.Parse(line.AsSpan(6).Trim().TrimEnd("kB").Trim(), System.Globalization.CultureInfo.InvariantCulture) * 1024;
        using var p = Process.GetCurrentProcess();
        return p.PeakWorkingSet64;
    }

    /// <summary>Private resident bytes (RssAnon on Linux; the private working set elsewhere).</summary>
    private static long AnonRss()
    {
        if (File.Exists("/proc/self/status"))
            foreach (var line in File.ReadLines("/proc/self/status"))
                if (line.StartsWith("RssAnon:", StringComparison.Ordinal))
                    return long.Parse(line.AsSpan(8).Trim().TrimEnd("kB").Trim(), System.Globalization.CultureInfo.InvariantCulture) * 1024;
        using var p = Process.GetCurrentProcess();
        return p.PrivateMemorySize64;
    }
}
