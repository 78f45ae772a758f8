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
        var accuracy = CommonOptions.Accuracy();
        var json = CommonOptions.Json();
        var command = new Command("engine", "Decode tokens/s: ONNX engine vs reference engine vs kernel-only bound, op overhead, memory with one vs all widths.") { model, tokens, accuracy, json };
        command.SetAction((r, ct) =>
        {
            var err = r.Err();
            using var ap = AnyPrecisionModel.Open(r.GetValue(model)!);
            var c = ap.Config;
            int steps = Math.Min(r.GetValue(tokens), c.MaxSeqLen - 8);
            var backend = CommonOptions.Backend(r.GetValue(accuracy)) ?? BitplaneBackend.Default;
            using var engine = new OnnxEngine(ap, new OnnxEngineOptions { Backend = backend });
            err.WriteLine($"{c.Layers} layers, dim {c.Dim}, {c.ParameterCount / 1e6:F1}M parameters; bitplane backend: {backend.Name}");

            // Memory first: the parent width alone, then every other width through the same session.
            // Memory first, on a fresh engine: the narrowest width alone, then every width through the same session.
            // The weights are the mapped model file, so its resident pages show what was read; private memory
            // (anonymous RSS) shows that no width made a copy.
            string dir = Path.GetFullPath(r.GetValue(model)!);
            Decode(engine, ap.SeedBits, steps, out _);
            GC.Collect();
            var (fileOne, anonOne) = (MappedRss(dir), AnonRss());
            foreach (int b in ap.SupportedBits) Decode(engine, b, steps, out _);
            GC.Collect();
            var (fileAll, anonAll) = (MappedRss(dir), AnonRss());
            // Then warm every path, so no figure below includes JIT compilation.
            foreach (int b in ap.SupportedBits) KernelOnlyMs(ap, b, backend);
            Decode(new ReferenceEngine(ap.ToWeights(ap.ParentBits)), ap.ParentBits, steps, out _);

            var rows = new List<Row>();
            foreach (int b in ap.SupportedBits)
            {
                ct.ThrowIfCancellationRequested();
                long ticks0 = engine.Operator.KernelTicks, calls0 = engine.Operator.KernelCalls;
                double onnx = Decode(engine, b, steps, out double seconds);
                double kernelMsPerToken = Stopwatch.GetElapsedTime(0, engine.Operator.KernelTicks - ticks0).TotalMilliseconds / steps;
                long callsPerToken = (engine.Operator.KernelCalls - calls0) / steps;
                double bound = 1000 / KernelOnlyMs(ap, b, backend);
                var reference = new ReferenceEngine(ap.ToWeights(b));
                Decode(reference, b, Math.Min(steps, 16), out _); // warm-up
                double refTps = Decode(reference, b, steps, out _);
                var row = new Row(b, Math.Round(onnx, 1), Math.Round(refTps, 1), Math.Round(bound, 1), Math.Round(1000 / onnx, 3),
                    Math.Round(kernelMsPerToken, 3), Math.Round(1000 / onnx - kernelMsPerToken, 3), callsPerToken);
                rows.Add(row);
                err.WriteLine($"  b={b}: onnx {row.onnx_tokens_per_second} tok/s (kernels {row.kernel_ms_per_token} ms + rest {row.rest_ms_per_token} ms per token), reference {row.reference_tokens_per_second} tok/s, kernel-only bound {row.kernel_only_tokens_per_second} tok/s");
            }
            var (opUs, directUs) = OperatorOverhead(ap, backend);
            var result = new
            {
                model = Path.GetFileName(Path.GetFullPath(r.GetValue(model)!)), layers = c.Layers, dim = c.Dim, parameters = c.ParameterCount,
                backend = backend.Name, decode_steps = steps, rows,
                op_call_us = Math.Round(opUs, 2), direct_call_us = Math.Round(directUs, 2), op_overhead_us = Math.Round(opUs - directUs, 2),
                model_file_mb = Mb(new DirectoryInfo(dir).EnumerateFiles("*.safetensors").Sum(f => f.Length)),
                seed_width_model_resident_mb = Mb(fileOne), all_widths_model_resident_mb = Mb(fileAll),
                seed_width_private_mb = Mb(anonOne), all_widths_private_mb = Mb(anonAll),
            };
            if (r.GetValue(json)) { r.WriteJson(result); return Task.FromResult(0); }
            var o = r.Out();
            o.WriteLine("| bits | ONNX engine tok/s | reference tok/s | kernel-only bound tok/s | kernel ms/token | rest ms/token |\n|---:|---:|---:|---:|---:|---:|");
            foreach (var x in rows)
                o.WriteLine($"| {x.bits} | {x.onnx_tokens_per_second} | {x.reference_tokens_per_second} | {x.kernel_only_tokens_per_second} | {x.kernel_ms_per_token} | {x.rest_ms_per_token} |");
            o.WriteLine($"BitplaneLinear through ORT {result.op_call_us} µs per call vs {result.direct_call_us} µs direct: overhead {result.op_overhead_us} µs");
            o.WriteLine($"model file {result.model_file_mb} MB: resident {result.seed_width_model_resident_mb} MB after serving {ap.SeedBits} bits, {result.all_widths_model_resident_mb} MB after all {ap.SupportedBits.Count} widths; private memory {result.seed_width_private_mb} MB then {result.all_widths_private_mb} MB");
            return Task.FromResult(0);
        });
        return command;
    }

    private sealed record Row(int bits, double onnx_tokens_per_second, double reference_tokens_per_second, double kernel_only_tokens_per_second,
        double onnx_ms_per_token, double kernel_ms_per_token, double rest_ms_per_token, long kernel_calls_per_token);

    /// <summary>Greedy decode of <paramref name="steps"/> tokens after a short prompt; tokens per second of the decode alone.</summary>
    private static double Decode(IInferenceEngine engine, int bits, int steps, out double seconds)
    {
        var c = engine.Config;
        if (engine is OnnxEngine onnx) onnx.Bits = bits;
        var cache = engine.CreateCache(Math.Min(c.MaxSeqLen, steps + 8));
        var logits = new float[c.VocabSize];
        int[] prompt = [c.BosTokenId, 3 % c.VocabSize, 5 % c.VocabSize, 7 % c.VocabSize];
        engine.Forward(prompt, cache, logits);
        var sw = Stopwatch.StartNew();
        for (int i = 0; i < steps; i++)
            engine.Forward([System.Numerics.Tensors.TensorPrimitives.IndexOfMax(logits)], cache, logits);
        seconds = sw.Elapsed.TotalSeconds;
        return steps / seconds;
    }

    /// <summary>Milliseconds per token of the linear layers alone, run back to back by the backend (median of passes).</summary>
    private static double KernelOnlyMs(AnyPrecisionModel ap, int bits, BitplaneBackend backend)
    {
        var c = ap.Config;
        var layers = Enumerable.Range(0, c.Layers).SelectMany(l => LlamaTensorNames.BlockLinears.Select(p => ap.Linear(l, p))).ToArray();
        var x = new float[Math.Max(c.Dim, c.HiddenDim)];
        var y = new float[Math.Max(Math.Max(c.Dim, c.HiddenDim), c.QDim)];
        for (int i = 0; i < x.Length; i++) x[i] = MathF.Sin(i) * 0.1f;
        void Pass() { foreach (var w in layers) backend.Multiply(w, bits, x.AsSpan(0, w.Cols), 1, y.AsSpan(0, w.Rows)); }
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
        op.Register(so);
        using var session = new InferenceSession(g.Build((BitplaneOperator.Domain, 1)).ToByteArray(), so);
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
